"""The numbers of the INT8 check: agreement of two outputs (cosine, SQNR), channel spreads,
uint8 fake quantization. Plain functions of arrays and tensors."""
import math
from typing import Optional

import numpy as np
from torch import Tensor


# -- the numbers ------------------------------------------------------------------------------
def as_numpy(value) -> np.ndarray:
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
        ref, got = as_numpy(reference).ravel(), as_numpy(test).ravel()
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
    absmax = as_numpy(absmax).ravel()
    if absmax.size == 0:
        return math.nan
    median = float(np.median(absmax))
    top = float(absmax.max())
    if median == 0.0:
        return math.inf if top > 0 else 1.0
    return top / median


def weight_spread(weight) -> float:
    """:func:`channel_spread` of a conv weight's per-output-channel (axis 0) max|w|."""
    weight = as_numpy(weight)
    return channel_spread(np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1))


def fake_quantize_uint8(values, low: float, high: float) -> np.ndarray:
    """``values`` through ONNX Runtime's asymmetric per-tensor uint8 quantization of [low, high]
    (the range widened to contain 0, as ONNX Runtime does), dequantized."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    values = as_numpy(values)
    if high == low:
        return np.zeros_like(values)
    scale = (high - low) / 255.0
    zero_point = np.clip(np.round(-low / scale), 0, 255)
    q = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def sortable(value: Optional[float]) -> float:
    """``value`` for sorting, with None and NaN first (as -inf)."""
    return -math.inf if value is None or math.isnan(value) else value
