"""INT8 post-training quantization check (orepa_mm.apis.quantization, tools/quantization_check.py).

The numbers are checked on known inputs and on small synthetic models whose quantization
behaviour is known by construction: the same function written with balanced channels and with
one output channel 1000x larger (compensated by the next layer) must report that layer first
and a much lower SQNR. The tool's refusals are one sentence, a non-zero exit and no file.
"""
import importlib.util
import json
import math
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from orepa_mm.apis import reparameterize_checkpoint
from orepa_mm.apis.quantization import quantization_check
from orepa_mm.apis.quantization_metrics import (Agreement, channel_spread, cosine_similarity,
                                                fake_quantize_uint8, sqnr_db, weight_spread)
from orepa_mm.apis.quantization_onnx import (OnnxFeatures, QuantizationCheckError, analyse_model,
                                             fake_quantize_weight, quantize_model)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'orepa_{name}_tool',
                                                  osp.join(REPO, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the numbers on known inputs --------------------------------------------------------------
def test_sqnr_and_cosine_of_known_arrays():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, np.array([3.0, 5.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert cosine_similarity(ref, np.array([3.0, 5.0])) == pytest.approx(29 / (5 * 34**0.5))
    assert sqnr_db(ref, ref) == math.inf and cosine_similarity(ref, ref) == pytest.approx(1.0)
    assert cosine_similarity(ref, -ref) == pytest.approx(-1.0)
    # noise 1/10 of the signal in amplitude: 20 dB, whatever the scale
    x = torch.randn(1000, dtype=torch.float64)
    assert sqnr_db(x * 7, x * 7 * 1.1) == pytest.approx(20.0)


def test_streaming_agreement_equals_one_shot():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    stream = Agreement()
    for x, y in zip(a, b):
        stream.add(x, y)
    assert stream.sqnr_db == pytest.approx(sqnr_db(a, b))
    assert stream.cosine == pytest.approx(cosine_similarity(a, b))
    with pytest.raises(ValueError):
        Agreement().add(np.zeros(3), np.zeros(4))


def test_weight_and_channel_spread():
    weight = np.ones((4, 2, 3, 3))
    weight[1] *= -2  # signs do not matter: max|w|
    weight[2] *= 3
    weight[3] *= 1000
    assert weight_spread(weight) == pytest.approx(1000 / 2.5)  # median of 1, 2, 3, 1000
    assert weight_spread(np.ones((8, 4, 1, 1))) == 1.0
    assert channel_spread([0.0, 0.0, 1.0]) == math.inf


def test_fake_quantization_matches_the_onnxruntime_grids():
    values = np.linspace(0, 2.55, 256)  # exactly uint8's grid on [0, 2.55]
    assert np.allclose(fake_quantize_uint8(values, 0.0, 2.55), values)
    noisy = np.random.default_rng(1).uniform(-1, 3, 1000)
    error = np.abs(fake_quantize_uint8(noisy, -1, 3) - noisy)
    assert error.max() <= (4 / 255) / 2 + 1e-12
    weight = np.random.default_rng(2).normal(size=(4, 3, 3, 3)) * np.array([1, 10, 100, 1000
                                                                            ])[:, None, None, None]
    per_channel = np.abs(fake_quantize_weight(weight) - weight).reshape(4, -1).max(axis=1)
    assert np.all(per_channel <= np.abs(weight).reshape(4, -1).max(axis=1) / 127 / 2 + 1e-12)


# -- small models ------------------------------------------------------------------------------
class Tiny(nn.Module):
    """conv-relu-conv-relu-conv; ``outlier`` scales one output channel of ``backbone.2`` by
    1000 and the matching input channel of ``backbone.4`` by 1/1000: the same function."""

    def __init__(self, outlier: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 8, 3, padding=1))
        with torch.no_grad():
            self.backbone[2].weight[5] *= outlier
            self.backbone[2].bias[5] *= outlier
            self.backbone[4].weight[:, 5] /= outlier
        self.eval()


def inputs(seed, count=4, size=24):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, size, size, generator=generator) for _ in range(count)]


def test_a_layer_with_a_1000x_channel_is_reported_first_with_a_lower_sqnr(one_thread):
    calib, test = inputs(1), inputs(2)
    balanced, _ = analyse_model(Tiny(), calib, test)
    outlier, _ = analyse_model(Tiny(outlier=1000.0), calib, test)
    with torch.no_grad():  # the same function: any difference is quantization's
        assert torch.allclose(
            Tiny().backbone(test[0]), Tiny(1000.0).backbone(test[0]), rtol=1e-3, atol=1e-4)
    first = outlier.layers[0]
    assert first.module == 'backbone.2' and first.weight_spread > 500
    assert all(layer.weight_spread < 5 for layer in balanced.layers)
    assert outlier.min_sqnr_db < balanced.min_sqnr_db - 10
    assert outlier.min_cosine < balanced.min_cosine
    assert balanced.min_sqnr_db > 25  # INT8 of a balanced small net: a few LSBs of noise
    # The layer that suffers is the consumer of the outlier activation: its input spans the
    # outlier channel's range, so the other 15 channels fall into a few uint8 steps.
    weakest = outlier.ranked_layers('sqnr')[0]
    assert weakest.module == 'backbone.4' and weakest.input_channel_spread > 100
    assert weakest.layer_sqnr_db < min(r.layer_sqnr_db for r in balanced.layers) - 10
    table = outlier.table(top=2)
    assert 'backbone.2' in table and 'lowest layer SQNR' in table
    json.dumps(outlier.as_dict())  # inf / nan are written as strings, not invalid JSON


def test_keeping_the_consumer_in_fp32_recovers_the_sqnr(one_thread):
    calib, test = inputs(1), inputs(2)
    worst, _ = analyse_model(Tiny(1000.0), calib, test)
    kept, graphs = analyse_model(Tiny(1000.0), calib, test, keep_fp32=['backbone.4'])
    # the conv, and what produces its input (ReLU, the outlier conv): in QDQ a tensor is
    # quantized when its producer or a consumer is, so keeping the conv alone would not do
    assert graphs.excluded == [
        '/backbone/backbone.4/Conv', '/backbone/backbone.3/Relu', '/backbone/backbone.2/Conv'
    ]
    assert kept.min_sqnr_db > worst.min_sqnr_db + 20
    assert not next(r for r in kept.layers if r.module == 'backbone.4').quantized
    with pytest.raises(QuantizationCheckError, match='names no conv'):
        analyse_model(Tiny(), calib, test, keep_fp32=['backbone.nothing'])


class WithNeck(nn.Module):
    """backbone (two levels) + neck, the way mm models expose them."""
    with_neck = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.neck = nn.Conv2d(8, 4, 1)

    def extract_feat(self, x):
        low = self.backbone(x)
        return (self.neck(low), nn.functional.max_pool2d(self.neck(low), 2))


def test_onnx_features_stand_in_for_extract_feat(tmp_path, one_thread):
    model = WithNeck().eval()
    calib = inputs(3, count=2, size=32)
    graphs = quantize_model(model, calib, str(tmp_path))
    assert graphs.output_labels == ['neck.0', 'neck.1'] and not graphs.single_output
    x = torch.randn(2, 3, 48, 40)  # another batch size and shape: dynamic axes
    fp32 = OnnxFeatures(graphs.fp32_path, graphs.output_names, graphs.single_output)(x)
    with torch.no_grad():
        reference = model.extract_feat(x)
    assert isinstance(fp32, tuple) and len(fp32) == 2
    for got, ref in zip(fp32, reference):
        assert torch.allclose(got, ref, atol=1e-5)
    int8 = OnnxFeatures(graphs.int8_path, graphs.output_names, graphs.single_output)(x)
    assert sqnr_db(reference[0], int8[0]) > 20


# -- the tool: refusals ------------------------------------------------------------------------
def run_tool(argv, capsys):
    tool = load_tool('quantization_check')
    code = tool.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence(code, err, expected):
    assert code == 2  # bad input, as in every tool (orepa_mm.utils.errors)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0]
    assert lines[0].endswith('.') or lines[0].endswith(').')


def test_missing_directory_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'report.json'
    code, _, err = run_tool([str(tmp_path / 'nowhere'), '--out', str(out)], capsys)
    assert_one_sentence(code, err, 'does not exist')
    assert not out.exists()


def test_a_directory_without_deploy_pth_is_not_a_deploy_directory(tmp_path, capsys):
    (tmp_path / 'deploy_config.py').write_text('model = dict()\n')
    out = tmp_path / 'report.json'
    code, _, err = run_tool([str(tmp_path), '--out', str(out)], capsys)
    assert_one_sentence(code, err, 'is not a deploy directory: it has no deploy.pth')
    assert not out.exists()
    code, _, err = run_tool([str(tmp_path / 'deploy_config.py')], capsys)
    assert_one_sentence(code, err, 'is not a directory')


CLASSIFIER = """
default_scope = 'mmpretrain'
{imports}
model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8, out_indices=(3, )
                  {conv}),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=2, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
data_preprocessor = dict(num_classes=2, mean=[127.5] * 3, std=[64.0] * 3, to_rgb=True)
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(32, 32)),
                 dict(type='PackInputs')]
{val}
"""
VAL = """val_dataloader = dict(
    batch_size=4, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root='{root}', data_prefix='val',
                 pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
"""


def write_images(root, count=6):
    import cv2
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = osp.join(root, 'val', f'class{index % 2}')
        import os
        os.makedirs(folder, exist_ok=True)
        image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        image[..., index % 2] = 255  # the class is the colour
        cv2.imwrite(osp.join(folder, f'{index}.png'), image)


def classifier_dir(tmp_path, val: str, orepa: bool = False, name='deploy'):
    """A deploy-directory lookalike: ``deploy_config.py`` + ``deploy.pth`` of a tiny classifier
    (``orepa``: a train-time one with OREPA convs)."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    folder = tmp_path / name
    folder.mkdir()
    text = CLASSIFIER.format(
        imports="custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)"
        if orepa else '',
        conv=", conv_cfg=dict(type='OREPA')" if orepa else '',
        val=val)
    (folder / 'deploy_config.py').write_text(text)
    cfg = Config.fromfile(str(folder / 'deploy_config.py'))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    torch.save(dict(state_dict=model.state_dict(), meta={}), folder / 'deploy.pth')
    return folder


def test_a_config_without_val_data_is_refused(tmp_path, capsys):
    folder = classifier_dir(tmp_path, val='')
    out = tmp_path / 'report.json'
    code, _, err = run_tool([str(folder), '--out', str(out)], capsys)
    assert_one_sentence(code, err, 'has no val_dataloader')
    assert not out.exists()


def test_a_val_dataset_missing_on_disk_is_refused(tmp_path, capsys):
    folder = classifier_dir(tmp_path, val=VAL.format(root=tmp_path / 'not_here'))
    code, _, err = run_tool([str(folder), '--eval'], capsys)
    assert_one_sentence(code, err, 'Dataset not found')


def test_a_train_time_model_is_refused(tmp_path, capsys, one_thread):
    write_images(str(tmp_path / 'data'))
    folder = classifier_dir(tmp_path, val=VAL.format(root=tmp_path / 'data'), orepa=True)
    out = tmp_path / 'report.json'
    code, _, err = run_tool([str(folder), '--out', str(out)], capsys)
    assert_one_sentence(code, err, 'is a train-time model')
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path, capsys, one_thread):
    write_images(str(tmp_path / 'data'))
    folder = classifier_dir(tmp_path, val=VAL.format(root=tmp_path / 'data'))
    state = torch.load(folder / 'deploy.pth', weights_only=True)
    state['state_dict'].pop('head.fc.bias')
    state['state_dict']['head.extra'] = torch.zeros(1)
    torch.save(state, folder / 'deploy.pth')
    code, _, err = run_tool([str(folder)], capsys)
    assert_one_sentence(code, err, 'missing (head.fc.bias)')
    assert 'unexpected (head.extra)' in err and 're-create the directory' in err


def test_bad_numbers_are_refused(tmp_path, capsys):
    code, _, err = run_tool([str(tmp_path), '--calib', '0'], capsys)
    assert_one_sentence(code, err, 'at least 1')


# -- the tool on a real deploy directory -------------------------------------------------------
def test_the_tool_on_a_reparameterized_classifier(tmp_path, capsys, one_thread):
    """OREPA classifier -> reparameterize_checkpoint -> the check with --eval: report printed,
    JSON and INT8 ONNX written, fp32 metric through ONNX Runtime equal to PyTorch's."""
    write_images(str(tmp_path / 'data'), count=12)
    train = classifier_dir(
        tmp_path, val=VAL.format(root=tmp_path / 'data'), orepa=True, name='train')
    deploy_dir = tmp_path / 'deployed'
    reparameterize_checkpoint(
        str(train / 'deploy_config.py'), str(train / 'deploy.pth'), str(deploy_dir), verbose=False)
    out, onnx_file = tmp_path / 'r' / 'report.json', tmp_path / 'int8.onnx'
    code, stdout, err = run_tool([
        str(deploy_dir), '--calib', '4', '--images', '4', '--eval', '--out',
        str(out), '--save-onnx',
        str(onnx_file)
    ], capsys)
    assert code == 0, err
    assert 'layers most at risk' in stdout and 'accuracy/top1' in stdout
    record = json.loads(out.read_text())
    assert record['calib_images'] == 4 and record['test_images'] == 4
    assert len(record['layers']) == 20  # ResNet-18: stem + 16 3x3 + 3 downsample 1x1
    stock_modules = set(dict(_deployed(deploy_dir).named_modules()))
    assert {layer['module'] for layer in record['layers']} <= stock_modules
    assert 'backbone.layer1.1.conv1' in stock_modules  # names are module paths
    assert set(record['metrics']) == {'fp32', 'int8'}
    assert onnx_file.stat().st_size > 0
    # the fp32 ONNX Runtime backbone + neck gives PyTorch's metric
    from orepa_mm.apis.quantization import evaluate
    from orepa_mm.utils.config_io import read_config
    cfg = read_config(str(deploy_dir / 'deploy_config.py'))
    assert evaluate(_deployed(deploy_dir), cfg) == record['metrics']['fp32']
    # failures write nothing, successes overwrite atomically: no temporaries left
    assert sorted(p.name for p in out.parent.iterdir()) == ['report.json']


def _deployed(deploy_dir):
    from orepa_mm.utils.config_io import build_model, read_config
    model = build_model(read_config(str(deploy_dir / 'deploy_config.py')), 'cpu', 'deployed')
    model.load_state_dict(torch.load(deploy_dir / 'deploy.pth')['state_dict'])
    return model.eval()


def test_the_report_object_directly(tmp_path, one_thread):
    write_images(str(tmp_path / 'data'), count=6)
    train = classifier_dir(
        tmp_path, val=VAL.format(root=tmp_path / 'data'), orepa=True, name='train')
    deploy_dir = tmp_path / 'deployed'
    reparameterize_checkpoint(
        str(train / 'deploy_config.py'), str(train / 'deploy.pth'), str(deploy_dir), verbose=False)
    report = quantization_check(str(deploy_dir), calib=4, images=4, verbose=False)
    assert report.calib_images == 4 and report.test_images == 4
    assert any('overlap' in note for note in report.notes)  # 6 images: 4 + 4 overlap
    assert report.outputs[0].name == 'neck.0' and 0 < report.outputs[0].cosine <= 1
    assert report.layers[0].weight_spread >= report.layers[-1].weight_spread
    ranked = [r.layer_sqnr_db for r in report.ranked_layers('sqnr')]
    assert ranked == sorted(r.layer_sqnr_db for r in report.layers)


# -- the detector, end to end (slow) ----------------------------------------------------------
@pytest.mark.slow
def test_the_tool_on_the_demo_detector_as_a_subprocess(tmp_path):
    """The demo Faster R-CNN (untrained, tiny data) through reparameterize and the tool's
    command line: exit 0, one SQNR per FPN level, bbox mAP fp32 and INT8 in the JSON."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope

    from demo_dataset import generate_demo_dataset
    data = tmp_path / 'data'
    generate_demo_dataset(str(data), num_train=2, num_val=6, seed=0)
    study = load_tool('int8_study')
    config = osp.join(REPO, 'configs', 'demo', 'faster_rcnn_orepa_r18_demo.py')
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(dict(kv.split('=', 1) for kv in study.data_options(str(data))))
    train_config = tmp_path / 'train_config.py'
    cfg.dump(str(train_config))
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    torch.save(dict(state_dict=model.state_dict(), meta={}), tmp_path / 'ckpt.pth')
    deploy_dir = tmp_path / 'deploy'
    reparameterize_checkpoint(
        str(train_config), str(tmp_path / 'ckpt.pth'), str(deploy_dir), verbose=False)
    out = tmp_path / 'report.json'
    result = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'quantization_check.py'),
        str(deploy_dir), '--calib', '2', '--images', '2', '--eval', '--out',
        str(out)
    ],
                            capture_output=True,
                            text=True,
                            cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [o['name'] for o in record['outputs']] == [f'neck.{i}' for i in range(5)]
    assert 'coco/bbox_mAP' in record['metrics']['int8']
    assert 'task metric (6 val images)' in result.stdout  # untrained: -1 rows are left out
    # and the study's row of it
    row = study.row_of(study.VARIANTS['orepa'], _report_from(record), None)
    assert len(row['sqnr_db']) == 5


def _report_from(record):
    """A QuantizationReport rebuilt from its JSON (what int8_study.row_of reads)."""
    from orepa_mm.apis.quantization_report import LayerRisk, OutputQuality, QuantizationReport

    def number(value):
        return float(value) if isinstance(value, str) else value

    layers = [
        LayerRisk(
            **{
                k: (number(v) if k in ('weight_spread', 'input_channel_spread',
                                       'layer_sqnr_db') else v)
                for k, v in layer.items()
            }) for layer in record['layers']
    ]
    outputs = [
        OutputQuality(o['name'], tuple(o['shape']), number(o['cosine']), number(o['sqnr_db']))
        for o in record['outputs']
    ]
    return QuantizationReport(
        source=record['source'],
        settings=record['settings'],
        calib_images=record['calib_images'],
        test_images=record['test_images'],
        outputs=outputs,
        layers=layers,
        metrics=record['metrics'],
        metric_names=record['metric_names'])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['plain', 'dbb', 'orepa', 'repvgg', 'orepa_vgg'])
def test_every_study_variant_deploys_and_is_checked(name, tmp_path, one_thread):
    """tools/int8_study.py's rows without the training: each variant config builds, deploys
    (re-parameterized, as is, or RepVGG's own fusion) into a directory the check accepts."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope

    from demo_dataset import generate_demo_dataset
    data = tmp_path / 'data'
    generate_demo_dataset(str(data), num_train=2, num_val=2, seed=0)
    study = load_tool('int8_study')
    variant = study.VARIANTS[name]
    cfg = Config.fromfile(study.variant_config(variant, str(tmp_path / 'configs')))
    cfg.merge_from_dict(dict(kv.split('=', 1) for kv in study.data_options(str(data))))
    work_dir = tmp_path / name
    work_dir.mkdir()
    cfg.dump(str(work_dir / variant.config_name))  # what the Runner dumps
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    model.eval()
    with torch.no_grad():  # every variant feeds the demo FPN 16-32-64-128 channels
        outs = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    if name in ('repvgg', 'orepa_vgg'):  # A0's depth
        assert sum(len(getattr(model.backbone, s)) for s in model.backbone.stages) == 21
    torch.save(dict(state_dict=model.state_dict(), meta={}), tmp_path / 'ckpt.pth')
    deploy_dir = study.deploy(variant, str(work_dir), str(tmp_path / 'ckpt.pth'))
    text = open(osp.join(deploy_dir, 'deploy_config.py')).read()
    assert 'orepa_mm' not in text.split('\n', 3)[-1]  # past the header: stock modules only
    report = quantization_check(deploy_dir, calib=1, images=1, verbose=False)
    assert [o.name for o in report.outputs] == [f'neck.{i}' for i in range(5)]
    assert report.layers and all(math.isfinite(o.sqnr_db) for o in report.outputs)
