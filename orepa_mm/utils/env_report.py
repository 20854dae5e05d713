"""The installed stack in one line, for bug reports: ``python -m orepa_mm.utils.env_report``.

``make install`` ends with it. It names what decides whether orepa_mm can work here: torch and
the CUDA it was built for, whether mmcv has its compiled ops (and CUDA ops), the three
downstream libraries, and whether orepa_mm's fused CPU loops were built.
"""
import importlib
from typing import List


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # noqa: BLE001  (a broken install is what this reports)
        return f'missing ({type(error).__name__})'


def _torch() -> str:
    import torch
    build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'cpu'
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f'torch {torch.__version__} ({build} build, {gpus} GPU visible)'


def _mmcv() -> str:
    version = _version('mmcv')
    if version.startswith('missing'):
        return f'mmcv {version}'
    try:
        from mmcv.ops import get_compiling_cuda_version
    except Exception as error:  # noqa: BLE001
        return f'mmcv {version} (without ops: {type(error).__name__})'
    cuda = get_compiling_cuda_version()
    cuda_ops = f'with CUDA {cuda} ops' if cuda != 'not available' else 'without CUDA ops'
    return f'mmcv {version} (with ops, {cuda_ops})'


def _fused_loops() -> str:
    from orepa_mm.cnn.fused_ops import KXK_KERNEL_OPS
    return 'fused CPU loops built' if KXK_KERNEL_OPS is not None else 'fused CPU loops NOT built'


def environment_summary() -> str:
    """The one-line report, e.g. ``torch 2.14.1+cu130 (CUDA 13.0 build, 0 GPU visible) | mmcv
    2.1.0 (with ops, without CUDA ops) | mmdet 3.3.0 | ... | orepa_mm 0.1.0, fused CPU loops
    built``."""
    parts: List[str] = [_torch(), _mmcv()]
    parts += [f'{name} {_version(name)}' for name in ('mmengine', 'mmdet', 'mmseg', 'mmpretrain')]
    orepa = _version('orepa_mm')
    parts.append(f'orepa_mm {orepa}' +
                 ('' if orepa.startswith('missing') else f', {_fused_loops()}'))
    return ' | '.join(parts)


if __name__ == '__main__':
    print(environment_summary())
