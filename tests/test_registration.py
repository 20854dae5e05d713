"""``custom_imports=dict(imports=['orepa_mm'])`` makes orepa_mm visible in every registry.

Each check runs in a fresh interpreter: registration must not depend on import order or on a
test having imported orepa_mm before.
"""
import subprocess
import sys
import textwrap

import pytest

SCOPES = {
    'mmdet': ['OREPAResNet', 'OREPAResNetV1d', 'OREPAVGG'],
    'mmseg': ['OREPAResNet', 'OREPAResNetV1c', 'OREPAResNetV1d', 'OREPAVGG'],
    'mmpretrain': ['OREPAResNet', 'OREPAResNetV1c', 'OREPAResNetV1d', 'OREPAVGG'],
}


@pytest.mark.slow
@pytest.mark.parametrize('scope', sorted(SCOPES))
def test_custom_imports_registers_backbones_and_conv_types(scope):
    script = textwrap.dedent(f"""
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        cfg = Config(dict(custom_imports=dict(imports=['orepa_mm'],
                                              allow_failed_imports=False)))
        assert 'orepa_mm' not in __import__('sys').modules
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
        init_default_scope('{scope}')
        from {scope}.registry import MODELS
        for name in {SCOPES[scope]!r}:
            assert MODELS.get(name) is not None, name
        backbone = MODELS.build(dict(type='OREPAResNet', depth=18, base_channels=8))
        assert type(backbone.layer1[0].conv1).__name__ == 'OREPAConv2d'
        # mmcv's build_conv_layer finds the conv types from inside this scope.
        from mmcv.cnn import build_conv_layer
        for cfg_type, k, want in [('OREPA', 3, 'OREPAConv2d'), ('OREPA', 1, 'OREPAConv1x1'),
                                  ('OREPA', 7, 'OREPALargeConv2d'), ('DBB', 3, 'DBBConv2d'),
                                  ('OREPAVGGConv', 3, 'OREPAConv2d')]:
            layer = build_conv_layer(dict(type=cfg_type), 4, 8, k, padding=k // 2)
            assert type(layer).__name__ == want, (cfg_type, k, type(layer))
        print('ok')
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr


def test_registration_is_idempotent():
    from mmdet.registry import MODELS

    import orepa_mm
    before = MODELS.get('OREPAResNet')
    assert orepa_mm.register_all_modules() == ['mmdet', 'mmseg', 'mmpretrain']
    assert MODELS.get('OREPAResNet') is before


def test_import_registers_and_loads_nothing_heavier():
    """``import orepa_mm`` (what ``custom_imports`` runs) loads the method and its registration,
    not the conversion APIs, the tools' helpers, ONNX or the Triton kernels (those load when
    used: a CUDA tensor's kernel, a conversion, a tool)."""
    code = textwrap.dedent('''
        import sys
        import orepa_mm
        heavy = ('orepa_mm.apis', 'orepa_mm.utils.cli', 'orepa_mm.cnn.triton_kernels', 'onnx',
                 'onnxruntime', 'mmdeploy')
        print(sorted(name for name in heavy if name in sys.modules))
    ''')
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
