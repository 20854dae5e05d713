"""INT8 with ONNX Runtime: export the deployed backbone (+ neck), quantize it (QDQ, static,
calibrated), run both graphs and rank the convs most at risk (:func:`analyse_model`)."""
import contextlib
import math
import os.path as osp
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..utils.errors import first_line
from .quantization_metrics import (Agreement, as_numpy, channel_spread, fake_quantize_uint8,
                                   sortable, weight_spread)
from .quantization_report import LayerRisk, OutputQuality, QuantizationReport
from .reparameterize import ReparameterizeError
from .verification import FeatureExtractor, export_onnx, flatten_tensors, run_safely

CALIBRATION_METHODS = ('minmax', 'entropy', 'percentile')

INPUT_NAME = 'input'  # what export_onnx names the graph input


class QuantizationCheckError(ReparameterizeError):
    """Bad input for the check: one sentence; nothing was written (exit code 2)."""


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
_PASS_THROUGH = frozenset({
    'Relu', 'Clip', 'LeakyRelu', 'MaxPool', 'Identity', 'Pad', 'Resize', 'Reshape', 'Flatten',
    'Squeeze', 'Unsqueeze', 'Transpose'
})


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
    return {
        'minmax': CalibrationMethod.MinMax,
        'entropy': CalibrationMethod.Entropy,
        'percentile': CalibrationMethod.Percentile
    }[name]


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


def quantize_model(model: nn.Module,
                   calib_inputs: Sequence[Tensor],
                   work_dir: str,
                   *,
                   calibration: str = 'minmax',
                   keep_fp32: Sequence[str] = (),
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
        hits = [
            n for n in convs if _module_of(n) == prefix or _module_of(n).startswith(prefix + '.')
        ]
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
            quantize_static(
                fp32_path,
                int8_path,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
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
    settings = dict(
        onnxruntime=onnxruntime.__version__,
        format='QDQ',
        weights='int8 symmetric ' + ('per output channel' if per_channel else 'per tensor'),
        activations='uint8 asymmetric per tensor',
        calibration=calibration,
        keep_fp32=list(keep_fp32))
    return QuantizedGraphs(fp32_path, int8_path, list(names), labels, single, ranges, excluded,
                           settings)


def compare_quantized_outputs(graphs: QuantizedGraphs,
                              test_inputs: Sequence[Tensor],
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
    outputs = [
        OutputQuality(label, shape, a.cosine, a.sqnr_db)
        for label, shape, a in zip(graphs.output_labels, shapes, agreements)
    ]
    return outputs, {k: float(np.median(v)) for k, v in times.items()}


def fake_quantize_weight(weight) -> np.ndarray:
    """A conv weight through symmetric int8 quantization per output channel ([-127, 127], as
    ONNX Runtime's ``per_channel`` weights), dequantized."""
    weight = as_numpy(weight)
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
    return dict(
        stride=tuple(attrs.get('strides', [1, 1])),
        dilation=tuple(attrs.get('dilations', [1, 1])),
        groups=int(attrs.get('group', 1)),
        pads=(pads[1], pads[3], pads[0], pads[2]))  # F.pad order: left right top bottom


def _conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], attrs: dict) -> Tensor:
    xt = torch.nn.functional.pad(torch.from_numpy(np.array(x, dtype=np.float32)), attrs['pads'])
    return torch.nn.functional.conv2d(
        xt,
        torch.from_numpy(np.array(weight, dtype=np.float32)),
        None if bias is None else torch.from_numpy(np.array(bias, dtype=np.float32)),
        stride=attrs['stride'],
        dilation=attrs['dilation'],
        groups=attrs['groups'])


def layer_risks(graphs: QuantizedGraphs,
                calib_inputs: Sequence[Tensor],
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
    arrays.update({
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == 'Constant' and n.attribute and n.attribute[0].name == 'value'
    })
    convs = [
        n for n in model.graph.node
        if n.op_type == 'Conv' and n.input[1] in arrays and arrays[n.input[1]].ndim >= 3
    ]
    sources = sorted({n.input[0] for n in convs})
    wanted = [name for name in sources if name != INPUT_NAME]
    graph_outputs = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in graph_outputs:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    absmax: Dict[str, np.ndarray] = {}
    agreements = {n.name: Agreement() for n in convs}
    attributes = {
        n.name: (_conv_attributes(n) if arrays[n.input[1]].ndim == 4 else None)
        for n in convs
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'probe.onnx')
        onnx.save(model, path)
        session = _session(path, threads)
        for x in _numpy_inputs(calib_inputs):
            values = dict(zip(wanted, session.run(wanted, {INPUT_NAME: x}))) if wanted else {}
            values[INPUT_NAME] = x
            for name in sources:
                value = values[name]
                per_channel = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
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
                    quantized = _conv(
                        fake_quantize_uint8(value, low, high), fake_quantize_weight(weight), bias,
                        attrs)
                agreements[node.name].add(reference, quantized)

    risks = []
    for node in convs:
        weight = arrays[node.input[1]]
        source = node.input[0]
        agreement = agreements[node.name]
        risks.append(
            LayerRisk(
                module=_module_of(node),
                node=node.name,
                out_channels=int(weight.shape[0]),
                weight_spread=weight_spread(weight),
                input_range=graphs.ranges.get(source, (math.nan, math.nan)),
                input_channel_spread=channel_spread(absmax[source]),
                layer_sqnr_db=agreement.sqnr_db if agreement.count else math.nan,
                quantized=node.name not in graphs.excluded))
    risks.sort(key=lambda r: (-sortable(r.weight_spread), sortable(r.layer_sqnr_db)))
    return risks


def analyse_model(model: nn.Module,
                  calib_inputs: Sequence[Tensor],
                  test_inputs: Sequence[Tensor],
                  *,
                  work_dir: Optional[str] = None,
                  calibration: str = 'minmax',
                  keep_fp32: Sequence[str] = (),
                  per_channel: bool = True,
                  threads: int = 1,
                  source: str = 'model') -> Tuple[QuantizationReport, QuantizedGraphs]:
    """Quantize ``model``'s backbone (+ neck), compare INT8 with fp32 on ``test_inputs`` and rank
    its convs (steps 1-4 of the module doc). ``work_dir`` keeps the ONNX files (a temporary
    directory, removed again, when None: the returned graphs' paths are then gone)."""
    if not test_inputs:
        raise QuantizationCheckError('the comparison needs at least one test image.')
    with _work_folder(work_dir) as folder:
        graphs = quantize_model(
            model,
            calib_inputs,
            folder,
            calibration=calibration,
            keep_fp32=keep_fp32,
            per_channel=per_channel)
        outputs, ms = compare_quantized_outputs(graphs, test_inputs, threads)
        layers = layer_risks(graphs, calib_inputs, threads)
    settings = dict(graphs.settings, threads=threads)
    report = QuantizationReport(
        source=source,
        settings=settings,
        calib_images=_count(calib_inputs),
        test_images=_count(test_inputs),
        outputs=outputs,
        layers=layers,
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
