"""Checking a conversion: one deterministic input, every output compared, costs measured.

A re-parameterized model is only worth writing if it computes what the train-time model
computes, so the same input goes through both (eval mode) and these are compared:

* ``backbone.*``  every backbone output (where the re-parameterization happens);
* ``neck.*``      ``model.extract_feat`` (backbone + neck), when the model has a neck;
* ``head.*``      the raw head outputs, ``model(..., mode='tensor')``;
* ``predict.*``   the tensors of ``model(..., mode='predict')`` (boxes, scores, seg logits,
  class scores), i.e. what users see.

The input is built the way a test loader would build it: a uint8 image at the config's test
size plus a library data sample with its metainfo, passed through the model's own
``data_preprocessor`` (normalisation, padding to the size divisor, ``batch_input_shape``).

Floating-point outputs are gated by a relative error, ``max|deployed - train| / max|train|``.
Integer outputs (labels, segmentation maps) are reported as the number of differing elements but
not gated: an argmax over two nearly tied scores may flip on float rounding alone.
"""
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.structures import BaseDataElement
from torch import Tensor

#: When the test pipeline names no size at all.
FALLBACK_INPUT_SIZE = (224, 224)


# -- the test input -------------------------------------------------------------------------
def _transforms(pipeline: Any) -> List[dict]:
    """A pipeline's transforms in order, entering ``TestTimeAug`` through its first choices."""
    found = []
    for transform in pipeline or []:
        if not isinstance(transform, dict):
            continue
        if str(transform.get('type', '')).endswith('TestTimeAug'):
            for choices in transform.get('transforms', []):
                found.extend(_transforms(choices[:1]))
        else:
            found.append(transform)
    return found


def _hw(value: Any, order: str) -> Optional[Tuple[int, int]]:
    """An int or a pair in ``order`` ('wh' or 'hw') as (h, w); None when not a size."""
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and v > 0 for v in value):
        return (value[1], value[0]) if order == 'wh' else (value[0], value[1])
    return None


def _pipeline_size(pipeline: Any) -> Optional[Tuple[int, int]]:
    """The image size (h, w) a test pipeline ends with; None when it names none.

    ``Resize(scale=(w, h))`` (mmcv order; with ``keep_ratio`` it bounds the long and short
    sides, so a landscape image of exactly that size is a valid test image),
    mmpretrain's ``ResizeEdge(scale=s)`` (an s x s image), mmdet's ``FixShapeResize`` and a final
    ``CenterCrop(crop_size=(w, h))``; the last one wins.
    """
    size = None
    for transform in _transforms(pipeline):
        name = str(transform.get('type', '')).rpartition('.')[2]
        if name in ('Resize', 'ResizeEdge'):
            size = _hw(transform.get('scale'), 'wh') or size
        elif name == 'FixShapeResize':
            size = _hw((transform.get('width'), transform.get('height')), 'wh') or size
        elif name == 'CenterCrop':
            size = _hw(transform.get('crop_size'), 'wh') or size
    return size


def _dataset_pipeline(dataset: Any) -> Any:
    """The pipeline of a dataset config, looking through wrappers (Repeat, Concat, ...)."""
    while isinstance(dataset, dict):
        if 'pipeline' in dataset:
            return dataset['pipeline']
        if 'dataset' in dataset:
            dataset = dataset['dataset']
        elif dataset.get('datasets'):
            dataset = dataset['datasets'][0]
        else:
            return None
    return None


def config_input_size(cfg) -> Tuple[Tuple[int, int], str]:
    """The (h, w) test input size of a config and where it was found."""
    for key in ('test_dataloader', 'val_dataloader'):
        loader = cfg.get(key)
        if isinstance(loader, dict):
            size = _pipeline_size(_dataset_pipeline(loader.get('dataset')))
            if size:
                return size, f'{key} pipeline'
    size = _pipeline_size(cfg.get('test_pipeline'))
    if size:
        return size, 'test_pipeline'
    crop = _hw(cfg.get('crop_size'), 'hw')
    if crop:
        return crop, 'crop_size'
    return FALLBACK_INPUT_SIZE, 'fallback: no test size in the config'


def library_of(model: nn.Module) -> str:
    """'mmdet', 'mmseg', 'mmpretrain', ...: the package that defines the model's class."""
    return type(model).__module__.split('.')[0]


def _data_sample(library: str, height: int, width: int):
    shape = (height, width)
    if library == 'mmdet':
        from mmdet.structures import DetDataSample
        return DetDataSample(
            metainfo=dict(
                img_id=0,
                img_path='',
                ori_shape=shape,
                img_shape=shape,
                scale_factor=(1.0, 1.0),
                flip=False,
                flip_direction=None))
    if library == 'mmseg':
        from mmseg.structures import SegDataSample
        return SegDataSample(
            metainfo=dict(
                img_path='',
                ori_shape=shape,
                img_shape=shape,
                pad_shape=shape,
                scale_factor=(1.0, 1.0),
                flip=False,
                flip_direction=None,
                reduce_zero_label=False))
    if library == 'mmpretrain':
        from mmpretrain.structures import DataSample
        return DataSample(metainfo=dict(ori_shape=shape, img_shape=shape))
    return BaseDataElement(metainfo=dict(ori_shape=shape, img_shape=shape))


def deterministic_image(input_size: Tuple[int, int], seed: int = 0) -> Tensor:
    """A deterministic uint8 (3, h, w) image, as a loader hands it to the data preprocessor."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *input_size), generator=generator, dtype=torch.uint8)


def make_batch(model: nn.Module, image: Tensor) -> dict:
    """``image`` run through ``model.data_preprocessor`` with a matching data sample.

    Built anew for every forward: ``predict`` writes its results into the data samples.
    """
    sample = _data_sample(library_of(model), *image.shape[-2:])
    return model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), False)


# -- collecting and comparing outputs -------------------------------------------------------
def flatten_tensors(prefix: str, value: Any) -> Dict[str, Tensor]:
    """Every tensor inside nested tuples, lists, dicts and data elements, by dotted path."""
    found: Dict[str, Tensor] = {}
    if isinstance(value, Tensor):
        found[prefix] = value.detach()
    elif isinstance(value, BaseDataElement):
        for key, item in value.items():
            found.update(flatten_tensors(f'{prefix}.{key}', item))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.update(flatten_tensors(f'{prefix}.{key}', item))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(flatten_tensors(f'{prefix}.{index}', item))
    return found


class FeatureExtractor(nn.Module):
    """``backbone`` (+ ``neck``) of a model as one module: what FLOPs and ONNX are taken of."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor):
        if getattr(self.model, 'with_neck', False):
            return self.model.extract_feat(inputs)
        return self.model.backbone(inputs)


#: The groups of outputs of :func:`model_outputs`, in the order a forward reaches them.
OUTPUT_GROUPS = ('backbone', 'neck', 'head', 'predict')


@torch.no_grad()
def model_outputs(model: nn.Module,
                  image: Tensor,
                  dtype: torch.dtype = torch.float32,
                  groups: Sequence[str] = OUTPUT_GROUPS) -> Dict[str, Tensor]:
    """All outputs compared between the train-time and the deployed model (see module doc).

    ``dtype``: what the preprocessed inputs are cast to (the model's parameters' dtype; the
    data preprocessors always produce float32). ``groups``: which of ``OUTPUT_GROUPS``.
    """

    def batch() -> dict:
        data = make_batch(model, image)
        data['inputs'] = data['inputs'].to(dtype)
        return data

    inputs = batch()['inputs']
    outputs = flatten_tensors('backbone', model.backbone(inputs))
    if 'neck' in groups and getattr(model, 'with_neck', False):
        outputs.update(flatten_tensors('neck', model.extract_feat(inputs)))
    if 'head' in groups:
        outputs.update(flatten_tensors('head', model(**batch(), mode='tensor')))
    if 'predict' in groups:
        outputs.update(flatten_tensors('predict', model(**batch(), mode='predict')))
    return outputs


@dataclass
class OutputError:
    """How far one deployed output is from the train-time one."""
    name: str
    max_abs: float
    rel: float
    gated: bool = True  # counts against the tolerance
    note: str = ''
    tolerance: Optional[float] = None  # its own gate (e.g. onnxruntime's), else the caller's

    def passes(self, rtol: float) -> bool:
        return not self.gated or self.rel <= (rtol if self.tolerance is None else self.tolerance)

    def as_dict(self) -> dict:
        record = dict(max_abs=self.max_abs, rel=self.rel)
        if self.note:
            record['note'] = self.note
        return record


def compare_outputs(reference: Dict[str, Tensor], actual: Dict[str, Tensor]) -> List[OutputError]:
    """One :class:`OutputError` per reference output (a missing one or a shape change fails)."""
    errors = []
    for name, ref in reference.items():
        got = actual.get(name)
        if got is None:
            errors.append(OutputError(name, math.inf, math.inf, note='missing after deploy'))
        elif got.shape != ref.shape:
            errors.append(
                OutputError(
                    name,
                    math.inf,
                    math.inf,
                    note=f'shape {tuple(got.shape)} != {tuple(ref.shape)}'))
        elif ref.is_floating_point():
            diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
            scale = ref.double().abs().max().item() if ref.numel() else 0.0
            errors.append(OutputError(name, diff, diff / scale if scale > 0 else diff))
        else:
            differing = int((got != ref).sum())
            errors.append(
                OutputError(
                    name,
                    float(differing),
                    differing / max(ref.numel(), 1),
                    gated=False,
                    note=f'{differing} of {ref.numel()} elements differ'))
    return errors


# -- cost ----------------------------------------------------------------------------------
def complexity(model: nn.Module, inputs: Tensor) -> Dict[str, float]:
    """Parameters of the model and of the backbone (+ neck), FLOPs of the backbone (+ neck).

    Counted with mmengine's ``FlopAnalyzer`` in eval mode. An OREPA layer convolves once with
    its (cached) squeezed kernel, so its FLOPs equal the deployed conv's: what
    re-parameterization saves at inference is the branch parameters and the kernel generation.
    Counting failures (an operator the analyzer cannot trace) give NaN, not an error.
    """
    from mmengine.analysis import FlopAnalyzer
    features = FeatureExtractor(model)
    result = dict(
        params=float(sum(p.numel() for p in model.parameters())),
        feature_params=float(_feature_params(model)))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            analyzer = FlopAnalyzer(features, (inputs, ))
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            result['flops'] = float(analyzer.total())
    except Exception:  # noqa: BLE001 - the number is informative only
        result['flops'] = math.nan
    return result


def _feature_params(model: nn.Module) -> int:
    """Parameters of the backbone and, when there is one, the neck."""
    parts = [getattr(model, name, None) for name in ('backbone', 'neck')]
    return sum(p.numel() for part in parts if isinstance(part, nn.Module)
               for p in part.parameters())


# -- ONNX ----------------------------------------------------------------------------------
def export_onnx(model: nn.Module, inputs: Tensor, path: str) -> List[str]:
    """Export backbone (+ neck) with dynamic batch (and height/width); returns output names.

    TorchScript-based exporter (``dynamo=False``), the one mmdeploy uses; it needs no
    onnxscript. Spatial axes are dynamic on the input and on every 4-D output.
    """
    features = FeatureExtractor(model).eval()
    with torch.no_grad():
        shapes = [t.dim() for t in flatten_tensors('', features(inputs)).values()]
    names = [f'feat{i}' for i in range(len(shapes))]
    dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for name, dim in zip(names, shapes):
        dynamic_axes[name] = {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'} \
            if dim == 4 else {0: 'batch'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(
            features, (inputs, ),
            path,
            dynamo=False,
            opset_version=17,
            input_names=['input'],
            output_names=names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True)
    return names


def check_onnx(model: nn.Module, inputs: Tensor, path: str,
               names: Sequence[str]) -> List[OutputError]:
    """onnxruntime (CPU) on ``path`` against PyTorch on the same input, output by output."""
    import onnxruntime
    with torch.no_grad():
        reference = list(flatten_tensors('', FeatureExtractor(model).eval()(inputs)).values())
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    results = session.run(list(names), {'input': inputs.detach().cpu().numpy()})
    return compare_outputs({
        f'onnx.{n}': r.cpu()
        for n, r in zip(names, reference)
    }, {
        f'onnx.{n}': torch.from_numpy(r)
        for n, r in zip(names, results)
    })


def run_safely(step: str, fn: Callable, *args, **kwargs):
    """Call ``fn``; re-raise any failure as ``RuntimeError('<step> failed (<Type>: <msg>)')``."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - turned into one sentence by the caller
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
        raise RuntimeError(f'{step} failed ({type(exc).__name__}: {first_line})') from exc
