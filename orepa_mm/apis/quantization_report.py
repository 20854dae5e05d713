"""The INT8 check's report: per output, per layer, the text table and its JSON form."""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..utils.text_table import format_rows
from .quantization_metrics import sortable

#: Layers listed by default in the report's table (``--top``).
DEFAULT_TOP_LAYERS = 10


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
            return sorted(
                self.layers, key=lambda r: (sortable(r.layer_sqnr_db), -sortable(r.weight_spread)))
        if rank_by != 'spread':
            raise ValueError(f'rank_by must be spread or sqnr, got {rank_by!r}')
        return list(self.layers)

    def table(self, top: int = DEFAULT_TOP_LAYERS, rank_by: str = 'spread') -> str:
        s = self.settings
        lines = [
            f'INT8 post-training quantization of backbone + neck: {self.source}',
            f"ONNX Runtime {s.get('onnxruntime')} quantize_static, {s.get('format')}, weights "
            f"{s.get('weights')}, activations {s.get('activations')}, {s.get('calibration')} "
            f'calibration on {self.calib_images} images; INT8 vs fp32 on '
            f'{self.test_images} other images', ''
        ]
        rows = [('output', 'shape', 'cosine', 'SQNR dB')]
        for o in self.outputs:
            rows.append((o.name, 'x'.join(map(str, o.shape)), f'{o.cosine:.5f}', _db(o.sqnr_db)))
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
        order = ('per-output-channel weight range spread'
                 if rank_by == 'spread' else 'lowest layer SQNR')
        lines.append('')
        lines.append(f'layers most at risk ({len(shown)} of {len(self.layers)} deployed convs, by '
                     f'{order}; BN folded):')
        rows = [('#', 'layer', 'out ch', 'w spread', 'input range', 'in ch spread', 'layer SQNR dB')
                ]
        for rank, layer in enumerate(shown, 1):
            lo, hi = layer.input_range
            rows.append(
                (str(rank), layer.module + ('' if layer.quantized else ' (fp32)'),
                 str(layer.out_channels), _num(layer.weight_spread), f'[{lo:.3g}, {hi:.3g}]',
                 _num(layer.input_channel_spread), _db(layer.layer_sqnr_db)))
        lines += format_rows(rows)
        worst = min((r for r in self.layers if not math.isnan(r.layer_sqnr_db)),
                    key=lambda r: r.layer_sqnr_db,
                    default=None)
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
