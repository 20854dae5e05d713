"""tools/reparameterize.py and orepa_mm.apis: train-time checkpoint -> stock deploy files.

Round trips use tiny but real models (Faster R-CNN, PSPNet, ImageClassifier, an mmseg model
with an OREPAVGG backbone) with randomised BN statistics and OREPA branches, and check the
deployed config + checkpoint in a fresh process that never imports orepa_mm, through the
libraries' own inference APIs. Bad inputs are checked through the CLI's ``main`` (exit code,
one sentence on stderr, nothing in ``--out``) and once as a real subprocess.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import EMAHook
from mmengine.model import ExponentialMovingAverage, revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope

import orepa_mm
from orepa_mm.apis import (EXIT_ALREADY_DEPLOYED, EXIT_BAD_INPUT, EXIT_VERIFICATION_FAILED,
                           ReparameterizeError, VerificationError, deploy_config,
                           reparameterize_checkpoint)
from orepa_mm.apis.deploy_gate import ARTEFACT_ROW, ARTEFACT_RTOL, DEFAULT_RTOL, FLOAT32_RTOL
from orepa_mm.cnn import ReparamConv2d
from orepa_mm.deploy import count_reparameterizable
from tests import reparam_configs as configs
from tests.reparam_fresh_process import outputs

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'reparameterize.py'
FRESH = REPO / 'tests' / 'reparam_fresh_process.py'
RTOL = 1e-4


def _load_tool():
    spec = importlib.util.spec_from_file_location('reparameterize_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


# -- helpers ---------------------------------------------------------------------------------
def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def build(config_path):
    cfg = Config.fromfile(str(config_path))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    model = revert_sync_batchnorm(model)
    model.eval()  # mmdet's and mmseg's ResNet.train() returns None: never chain it
    return model


def randomise(model, seed=0):
    """Random OREPA branches and BN statistics: default inits hide mistakes (zero-initialised
    branches and unit BN statistics make wrong formulas look right).

    Necks and heads get their library's initialisation (as training starts; without it an
    untrained RPN predicts boxes thousands of pixels wide that clipping makes ill-conditioned).
    BN statistics are then measured on random inputs, so activations keep a sane scale, and
    perturbed, with random affine parameters.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    for name in ('neck', 'rpn_head', 'roi_head', 'decode_head', 'auxiliary_head', 'head'):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module) and hasattr(part, 'init_weights'):
            part.init_weights()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReparamConv2d):
                for name, p in m.named_parameters(recurse=False):
                    if 'scale' in name:
                        p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
                    else:
                        spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
                        p.add_(torch.randn(p.shape, generator=g) * 0.2 * spread)
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            m.train()
        for _ in range(2):
            features = model.extract_feat(torch.randn(2, 3, 64, 64, generator=g))
            if hasattr(model, 'decode_head'):
                model.decode_head(features)
        model.eval()  # mmdet's and mmseg's ResNet.train() returns None: never chain it
        for m in norms:
            m.momentum = 0.1
            m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
            m.running_mean.add_(
                torch.randn(m.num_features, generator=g) * 0.1 * m.running_var.sqrt())
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


class Case:
    """A written train-time config + checkpoint and the randomised model they hold."""

    def __init__(self, folder: Path, name: str, text: str, seed: int = 0, meta=None):
        folder.mkdir(parents=True, exist_ok=True)
        self.config = str(folder / f'{name}.py')
        Path(self.config).write_text(text)
        torch.manual_seed(seed)  # the libraries' default inits use the global generator
        self.model = randomise(build(self.config), seed)
        self.checkpoint = str(folder / f'{name}.pth')
        self.meta = meta or dict(epoch=12, iter=3000, dataset_meta=dict(classes=('a', 'b')))
        torch.save(dict(meta=self.meta, state_dict=self.model.state_dict()), self.checkpoint)


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp('cases')
    return dict(
        detector=Case(folder, 'detector', configs.DETECTOR),
        segmentor=Case(folder, 'segmentor', configs.SEGMENTOR, seed=1),
        classifier=Case(folder, 'classifier', configs.CLASSIFIER, seed=2),
        segmentor_vgg=Case(folder, 'segmentor_vgg', configs.SEGMENTOR_VGG, seed=3),
        se_resnet=Case(folder, 'se_resnet', configs.SE_RESNET_CLASSIFIER, seed=4),
    )


@pytest.fixture(scope='module')
def converted(cases, tmp_path_factory):
    """Each case converted once by the library (the detector with --onnx)."""
    results = {}
    for name, case in cases.items():
        if name not in EXPECTED:
            continue
        out = tmp_path_factory.mktemp(f'deployed_{name}')
        results[name] = reparameterize_checkpoint(
            case.config,
            case.checkpoint,
            str(out),
            verbose=False,
            input_size=(32, 32) if name == 'segmentor_vgg' else None,
            export_onnx=name == 'detector')
    return results


def run_main(argv, capsys):
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code, err, expected_code, *words, out_dir):
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == []


def image_for(name):
    return torch.randint(
        0,
        256, (3, *EXPECTED[name][0]),
        generator=torch.Generator().manual_seed(7),
        dtype=torch.uint8)


@pytest.fixture(scope='module')
def fresh_process_outputs(converted, tmp_path_factory):
    """Every deployed model's outputs, computed in ONE process that never imports orepa_mm."""
    folder = tmp_path_factory.mktemp('fresh')
    argv = []
    for name, result in converted.items():
        torch.save(image_for(name), folder / f'{name}_image.pt')
        argv += [
            result.deploy_config, result.deploy_checkpoint,
            str(folder / f'{name}_image.pt'),
            str(folder / f'{name}_outputs.pt')
        ]
    env = dict(os.environ, PYTHONPATH='')  # the stock libraries only
    proc = subprocess.run([sys.executable, str(FRESH), *argv],
                          capture_output=True,
                          text=True,
                          env=env,
                          cwd=folder,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        name: torch.load(folder / f'{name}_outputs.pt', weights_only=True)
        for name in converted
    }


# -- round trips -----------------------------------------------------------------------------
EXPECTED = {
    'detector': (configs.DETECTOR_SIZE, dict(type='ResNet')),
    'segmentor': (configs.SEGMENTOR_SIZE, dict(type='ResNetV1c')),
    'classifier': (configs.CLASSIFIER_SIZE, dict(type='RepVGG', deploy=True)),
    'segmentor_vgg': ((32, 32), dict(type='mmpretrain.RepVGG', deploy=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(EXPECTED))
def test_round_trip_in_a_fresh_process_without_orepa_mm(name, cases, converted,
                                                        fresh_process_outputs):
    case, result = cases[name], converted[name]
    size, backbone = EXPECTED[name]
    out = Path(result.out_dir)
    assert set(os.listdir(out)) - {'deploy_backbone.onnx'} == {'deploy.pth', 'deploy_config.py'}

    # The deployed config: stock modules, no orepa_mm, no pretrained download.
    text = (out / 'deploy_config.py').read_text()
    body = '\n'.join(line for line in text.splitlines() if not line.startswith('#'))
    assert 'orepa_mm' not in body and 'OREPA' not in body
    cfg = Config.fromfile(str(out / 'deploy_config.py'))
    for key, value in backbone.items():
        assert cfg.model.backbone[key] == value
    assert cfg.model.backbone.get('init_cfg') is None and cfg.get('load_from') is None
    assert cfg.model.get('pretrained') is None

    # The deployed checkpoint: stock keys, original meta kept, conversion recorded.
    saved = torch.load(out / 'deploy.pth', weights_only=True)
    assert saved['meta']['epoch'] == 12
    assert saved['meta']['dataset_meta'] == case.meta['dataset_meta']
    record = saved['meta']['reparameterized']
    assert record['source_checkpoint'] == os.path.abspath(case.checkpoint)
    assert record['ema_used'] is False and record['orepa_mm_version'] == orepa_mm.__version__
    assert record['input_size'] == list(size) == list(result.input_size)
    assert 0 <= record['max_rel_error'] < DEFAULT_RTOL and record['rtol'] == DEFAULT_RTOL
    assert 0 < record['artefact_max_rel_error'] < ARTEFACT_RTOL == record['artefact_rtol']

    # Same input: train-time model here, deployed model in a process without orepa_mm.
    reference = outputs(case.model, image_for(name))
    deployed = fresh_process_outputs[name]
    assert set(deployed) == set(reference)
    for key, ref in reference.items():
        assert deployed[key].shape == ref.shape, key
        if ref.is_floating_point():
            assert rel_err(deployed[key], ref) < RTOL, key
        else:
            assert torch.equal(deployed[key], ref), key
    if name == 'detector':  # not a vacuous comparison
        assert reference['predict.0.pred_instances.bboxes'].shape[0] > 0


def test_result_reports_errors_costs_and_paths(converted):
    result = converted['detector']
    assert result.library == 'mmdet' and result.ema_used is False
    assert result.input_size == configs.DETECTOR_SIZE
    assert result.input_size_source == 'test_dataloader pipeline'
    assert result.num_reparameterized > 0
    names = [e.name for e in result.errors]
    assert 'backbone.3' in names and 'neck.4' in names and 'head.0.0' in names
    assert 'predict.0.pred_instances.bboxes' in names
    assert all(e.rel < RTOL for e in result.errors if e.gated)
    assert result.deploy_cost['params'] < result.train_cost['params']
    assert result.deploy_cost['feature_params'] < result.train_cost['feature_params']
    assert 0 < result.deploy_cost['flops'] <= result.train_cost['flops']
    assert result.deploy_checkpoint == os.path.join(result.out_dir, 'deploy.pth')
    assert 'detection_onnxruntime_dynamic.py' in result.mmdeploy_command()
    table = result.table()
    for word in ('train-time', 'deployed', 'FLOPs', 'backbone.0', 'onnx.feat0', 'deploy_config.py',
                 'deploy_backbone.onnx'):
        assert word in table
    assert converted['segmentor'].input_size_source == 'test_dataloader pipeline'
    assert converted['segmentor_vgg'].input_size_source == '--input-size'


def test_onnx_export_matches_onnxruntime(converted):
    onnxruntime = pytest.importorskip('onnxruntime')
    result = converted['detector']
    assert result.onnx_file and [e.name for e in result.onnx_errors
                                 ] == [f'onnx.feat{i}' for i in range(5)]
    assert all(e.rel < RTOL for e in result.onnx_errors)
    record = torch.load(result.deploy_checkpoint, weights_only=True)['meta']['reparameterized']
    assert 'onnx.feat0' in record['errors']

    # Independently: the ONNX backbone+FPN against the deployed PyTorch model, at another size
    # (the export has dynamic height/width).
    stock = build(result.deploy_config)
    stock.load_state_dict(torch.load(result.deploy_checkpoint, weights_only=True)['state_dict'])
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = stock.extract_feat(x)
    session = onnxruntime.InferenceSession(result.onnx_file, providers=['CPUExecutionProvider'])
    got = session.run(None, {'input': x.numpy()})
    assert len(got) == len(expected) == 5
    for ours, theirs in zip(got, expected):
        assert rel_err(torch.from_numpy(ours), theirs) < RTOL


def test_cli_prints_progress_errors_table_and_next_step(cases, tmp_path, capsys):
    case = cases['classifier']
    out = tmp_path / 'out'
    code, stdout, err = run_main([case.config, case.checkpoint, '--out', out, '--onnx'], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ['deploy.pth', 'deploy_backbone.onnx', 'deploy_config.py']
    for text in ('6/6', 'backbone.0', 'head', 'predict.0.pred_score', 'onnx.feat0',
                 'parameters (model)', 'FLOPs (backbone+neck, 32x32)',
                 f'wrote {out / "deploy.pth"}',
                 'configs/mmpretrain/classification_onnxruntime_dynamic.py'):
        assert text in stdout, text


# -- EMA ---------------------------------------------------------------------------------------
@pytest.fixture
def ema_checkpoint(cases, tmp_path):
    """A checkpoint as mmengine's EMAHook writes it: EMA weights under ``state_dict``, the raw
    ones under ``ema_state_dict`` (``module.`` keys + ``steps``)."""
    case = cases['classifier']
    raw = case.model
    averaged = randomise(build(case.config), seed=11)
    hook = EMAHook()
    hook.ema_model = ExponentialMovingAverage(averaged)
    hook.ema_model.steps.fill_(42)
    checkpoint = dict(meta=dict(epoch=1), state_dict=dict(raw.state_dict()))
    hook.before_save_checkpoint(None, checkpoint)
    path = tmp_path / 'ema.pth'
    torch.save(checkpoint, path)
    return case, str(path), raw, averaged


@pytest.mark.parametrize('flag', [None, '--ema', '--no-ema'])
def test_ema_weights_are_used_unless_no_ema(flag, ema_checkpoint, tmp_path, capsys):
    case, path, raw, averaged = ema_checkpoint
    out = tmp_path / 'out'
    code, stdout, err = run_main([case.config, path, '--out', out, *([flag] if flag else [])],
                                 capsys)
    assert code == 0, err
    use_ema = flag != '--no-ema'
    assert ('EMA weights (mmengine EMAHook, 42 EMA steps)' in stdout) == use_ema
    record = torch.load(out / 'deploy.pth', weights_only=True)['meta']['reparameterized']
    assert record['ema_used'] is use_ema
    stock = build(out / 'deploy_config.py')
    stock.load_state_dict(torch.load(out / 'deploy.pth', weights_only=True)['state_dict'])
    image = torch.randint(
        0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    key = 'head'
    expected = outputs(averaged if use_ema else raw, image)
    other = outputs(raw if use_ema else averaged, image)
    got = outputs(stock, image)
    head = [k for k in expected if k.startswith(key)]
    assert head and all(rel_err(got[k], expected[k]) < RTOL for k in head)
    assert any(rel_err(got[k], other[k]) > 1e-2 for k in head)


def test_ema_required_but_absent(cases, tmp_path, capsys):
    case = cases['classifier']
    out = tmp_path / 'out'
    code, _, err = run_main([case.config, case.checkpoint, '--out', out, '--ema'], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'no EMA weights', out_dir=out)


# -- bad input -----------------------------------------------------------------------------------
def test_missing_config_and_checkpoint(cases, tmp_path, capsys):
    case = cases['classifier']
    out = tmp_path / 'out'
    code, _, err = run_main([tmp_path / 'nope.py', case.checkpoint, '--out', out], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'config', 'does not exist', out_dir=out)
    code, _, err = run_main([case.config, tmp_path / 'nope.pth', '--out', out], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'checkpoint', 'does not exist', out_dir=out)


def test_unreadable_config(tmp_path, cases, capsys):
    broken = tmp_path / 'broken.py'
    broken.write_text('model = dict(type=\n')
    out = tmp_path / 'out'
    code, _, err = run_main([broken, cases['classifier'].checkpoint, '--out', out], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'cannot read config', out_dir=out)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'not_a_dict'])
def test_truncated_or_corrupt_checkpoint(damage, cases, tmp_path, capsys):
    case = cases['classifier']
    bad = tmp_path / 'bad.pth'
    data = Path(case.checkpoint).read_bytes()
    if damage == 'truncated':
        bad.write_bytes(data[:len(data) // 2])
    elif damage == 'garbage':
        bad.write_bytes(os.urandom(4096))
    elif damage == 'empty':
        bad.write_bytes(b'')
    else:
        torch.save(torch.zeros(3), bad)
    out = tmp_path / 'out'
    code, _, err = run_main([case.config, bad, '--out', out], capsys)
    words = ('holds a Tensor', ) if damage == 'not_a_dict' else ('cannot read checkpoint', )
    assert_refused(code, err, EXIT_BAD_INPUT, *words, out_dir=out)


def test_config_checkpoint_mismatch(cases, tmp_path, capsys):
    out = tmp_path / 'out'
    code, _, err = run_main(
        [cases['classifier'].config, cases['detector'].checkpoint, '--out', out], capsys)
    assert_refused(
        code,
        err,
        EXIT_BAD_INPUT,
        'does not match config',
        'keys missing',
        'unexpected',
        out_dir=out)

    # Same keys, other shapes: a head with another number of classes.
    other = tmp_path / 'classifier7.py'
    other.write_text(configs.CLASSIFIER.replace('num_classes=5', 'num_classes=7'))
    code, _, err = run_main([other, cases['classifier'].checkpoint, '--out', out], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'other shapes', 'head.fc.weight', out_dir=out)


def test_nothing_to_reparameterize(tmp_path, capsys):
    config = tmp_path / 'stock.py'
    config.write_text(configs.STOCK_CLASSIFIER)
    model = build(config)
    checkpoint = tmp_path / 'stock.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    out = tmp_path / 'out'
    code, _, err = run_main([config, checkpoint, '--out', out], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'nothing to re-parameterize', out_dir=out)


def test_already_deployed_checkpoint(cases, converted, tmp_path, capsys):
    out = tmp_path / 'out'
    deployed = converted['classifier'].deploy_checkpoint
    for config in (converted['classifier'].deploy_config, cases['classifier'].config):
        code, _, err = run_main([config, deployed, '--out', out], capsys)
        assert_refused(code, err, EXIT_ALREADY_DEPLOYED, 'already re-parameterized', out_dir=out)
    # Stock keys without orepa_mm's record (e.g. meta stripped) are recognised too.
    stripped = tmp_path / 'stripped.pth'
    state = torch.load(deployed, weights_only=True)['state_dict']
    torch.save(dict(state_dict=state), stripped)
    code, _, err = run_main([cases['classifier'].config, stripped, '--out', out], capsys)
    assert_refused(code, err, EXIT_ALREADY_DEPLOYED, 'already re-parameterized', out_dir=out)


def test_unwritable_output_dir(cases, tmp_path, capsys):
    case = cases['classifier']
    a_file = tmp_path / 'file.txt'
    a_file.write_text('x')
    for out in (a_file, a_file / 'sub'):
        code, _, err = run_main([case.config, case.checkpoint, '--out', out], capsys)
        assert code == EXIT_BAD_INPUT and 'output directory' in err
        assert a_file.read_text() == 'x'


@pytest.mark.skipif(
    hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root writes to read-only directories')
def test_read_only_output_dir(cases, tmp_path, capsys):
    case = cases['classifier']
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_main([case.config, case.checkpoint, '--out', locked / 'out'], capsys)
        assert_refused(code, err, EXIT_BAD_INPUT, 'not writable', out_dir=locked)
    finally:
        locked.chmod(0o700)


def _broken_to_conv2d(monkeypatch, relative_error: float):
    """Every baked kernel off by ``relative_error``: a wrong conversion that float32 rounding
    (rel ~1e-6) would hide from a float32 comparison at 1e-4."""
    from orepa_mm.cnn import ReparamConv2d
    exact = ReparamConv2d.to_conv2d

    def broken(self):
        conv = exact(self)
        with torch.no_grad():
            conv.weight.mul_(1 + relative_error)
        return conv

    monkeypatch.setattr(ReparamConv2d, 'to_conv2d', broken)


def test_verification_failure_writes_nothing(cases, tmp_path, capsys, monkeypatch):
    case = cases['classifier']
    out = tmp_path / 'out'
    _broken_to_conv2d(monkeypatch, 1e-6)
    code, stdout, err = run_main([case.config, case.checkpoint, '--out', out], capsys)
    assert_refused(
        code,
        err,
        EXIT_VERIFICATION_FAILED,
        'beyond their tolerance',
        'in float64',
        'rtol 1e-09',
        out_dir=out)
    assert 'FAIL' in stdout  # the per-output table explains which


@pytest.mark.slow
def test_float64_gate_separates_a_small_conversion_error_from_rounding(
        cases, tmp_path, monkeypatch):
    """The exact conversion is at ~1e-12 or below in float64, its float32 agreement at float32
    rounding (~1e-5 here); a 1e-8 kernel error stands out in float64 but hides in float32."""
    case = cases['se_resnet']
    exact = reparameterize_checkpoint(
        case.config, case.checkpoint, str(tmp_path / 'exact'), verbose=False)
    assert exact.max_rel_error < 1e-12
    fp32 = [e for e in exact.errors if e.name.startswith('float32')]
    assert fp32 and 1e-9 < fp32[0].rel < 1e-4  # float32 rounding, reported beside
    _broken_to_conv2d(monkeypatch, 1e-8)  # below float32's resolution (6e-8)
    with pytest.raises(VerificationError) as failure:
        reparameterize_checkpoint(
            case.config, case.checkpoint, str(tmp_path / 'broken'), verbose=False)
    worst = max(e.rel for e in failure.value.errors if e.gated and e.tolerance is None)
    assert DEFAULT_RTOL < worst < 1e-5  # caught in float64, far below float32 noise
    assert not (tmp_path / 'broken').exists()


def test_the_written_weights_are_gated_not_a_copy_baked_again(cases, tmp_path, capsys, monkeypatch):
    """A tensor damaged between the bake and the save (here: right after the baked weights are
    loaded into the stock model) is caught by the gate on what deploy.pth holds (its float32
    weights run in float64), although the float64 conversion check, which bakes again from the
    train-time model, passes."""
    from orepa_mm.apis import reparameterize as module
    convert = module._convert_into

    def convert_then_damage(stock, *args, **kwargs):
        num_baked = convert(stock, *args, **kwargs)
        with torch.no_grad():
            stock.backbone.stem.branch_reparam.weight.mul_(1.05)
        return num_baked

    monkeypatch.setattr(module, '_convert_into', convert_then_damage)
    case = cases['classifier']
    out = tmp_path / 'out'
    code, stdout, err = run_main([case.config, case.checkpoint, '--out', out], capsys)
    assert_refused(
        code,
        err,
        EXIT_VERIFICATION_FAILED,
        'of deploy.pth as written',
        'float64 from its float32 weights',
        'rtol 0.0001',
        out_dir=out)
    rows = [line for line in stdout.splitlines() if 'FAIL' in line]
    assert rows and all('deploy.pth as written' in line for line in rows)  # float64: all ok


def test_deploy_pth_is_read_back_from_disk_before_it_lands(cases, tmp_path, monkeypatch):
    """The file itself is checked: one bit of one tensor changed on its way to disk (an output
    change far below the float32 gate) and nothing lands."""
    save = torch.save

    def save_damaged(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and isinstance(obj, dict) and 'state_dict' in obj:
            state = dict(obj['state_dict'])
            key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
            damaged = state[key].clone()
            damaged.view(-1)[0] = torch.nextafter(damaged.view(-1)[0], torch.tensor(1e30))
            state[key] = damaged
            obj = dict(obj, state_dict=state)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_damaged)
    case = cases['classifier']
    out = tmp_path / 'out'
    with pytest.raises(VerificationError) as failure:
        reparameterize_checkpoint(case.config, case.checkpoint, str(out), verbose=False)
    message = str(failure.value)
    assert 'read back from disk' in message and '1 tensors differ' in message
    assert failure.value.exit_code == EXIT_VERIFICATION_FAILED and '\n' not in message
    assert not out.exists()


def test_cuda_unavailable(cases, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    case = cases['classifier']
    out = tmp_path / 'out'
    code, _, err = run_main([case.config, case.checkpoint, '--out', out, '--device', 'cuda'],
                            capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, 'CUDA is not available', out_dir=out)


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(['only_a_config.py'])
    assert exc.value.code == 2


@pytest.mark.slow
def test_cli_process_exit_code_and_single_stderr_line(cases, tmp_path):
    case = cases['classifier']
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable,
         str(TOOL), case.config,
         str(tmp_path / 'nope.pth'), '--out',
         str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        f'error: checkpoint {tmp_path / "nope.pth"} does not exist; pass a checkpoint written by '
        'tools/train.py.'
    ]
    assert not out.exists()


def test_library_raises_one_sentence(cases, tmp_path):
    with pytest.raises(ReparameterizeError) as exc:
        reparameterize_checkpoint(cases['classifier'].config, str(tmp_path / 'x.pth'),
                                  str(tmp_path / 'out'))
    assert exc.value.exit_code == EXIT_BAD_INPUT and '\n' not in str(exc.value)


# -- the deployed config -----------------------------------------------------------------------
def test_deploy_config_rewrites_to_stock_modules(tmp_path):
    path = tmp_path / 'det.py'
    path.write_text(
        configs.DETECTOR.replace("neck=dict(type='FPN',",
                                 "neck=dict(type='FPN', conv_cfg=dict(type='OREPA'),"))
    cfg = Config.fromfile(str(path))
    deployed = deploy_config(cfg)
    assert deployed.model.backbone.type == 'ResNet'
    assert deployed.model.backbone.init_cfg is None
    assert deployed.model.neck.conv_cfg is None
    assert deployed.get('custom_imports') is None and deployed.load_from is None
    # the input config is left alone
    assert cfg.model.backbone.type == 'OREPAResNet' and cfg.model.neck.conv_cfg.type == 'OREPA'
    assert cfg.custom_imports.imports == ['orepa_mm']


def test_deploy_config_repvgg_outside_mmpretrain_imports_it(tmp_path):
    path = tmp_path / 'seg.py'
    path.write_text(
        configs.SEGMENTOR_VGG.replace("imports=['orepa_mm']",
                                      "imports=['orepa_mm', 'my_project.hooks']"))
    deployed = deploy_config(Config.fromfile(str(path), import_custom_modules=False))
    assert deployed.model.backbone.type == 'mmpretrain.RepVGG'
    assert deployed.model.backbone.deploy is True and 'conv_cfg' not in deployed.model.backbone
    assert deployed.custom_imports.imports == ['my_project.hooks', 'mmpretrain.models']
    assert deployed.custom_imports.allow_failed_imports is False


@pytest.mark.parametrize('library', ['mmdet', 'mmseg', 'mmpretrain'])
def test_every_orepa_backbone_deploys_to_the_class_it_subclasses(library):
    """The deployed type names resolve, in each library, to the stock class each orepa_mm
    backbone extends, so the deployed state dict fits the deployed config."""
    import importlib
    backbones = importlib.import_module(f'orepa_mm.models.backbones.for_{library}').BACKBONES
    registry = importlib.import_module(f'{library}.registry').MODELS
    for name, cls in backbones.items():
        cfg = Config(dict(default_scope=library, model=dict(type=name)))
        deployed_type = deploy_config(cfg).model.type
        scope, _, stock_name = deployed_type.rpartition('.')
        target = (importlib.import_module(f'{scope}.registry').MODELS if scope else registry)
        stock = target.get(stock_name)
        assert stock is not None and issubclass(cls, stock), (name, deployed_type)
        assert not stock.__module__.startswith('orepa_mm')


@pytest.mark.slow
def test_any_model_with_orepa_conv_cfg_is_converted(tmp_path):
    """No orepa_mm backbone at all: a stock ResNet whose convs are OREPA via conv_cfg."""
    config = tmp_path / 'conv_cfg.py'
    config.write_text(
        configs.STOCK_CLASSIFIER.replace("base_channels=8)",
                                         "base_channels=8, conv_cfg=dict(type='OREPA'))"))
    model = randomise(build(config), seed=4)
    assert count_reparameterizable(model) > 0
    checkpoint = tmp_path / 'conv_cfg.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    result = reparameterize_checkpoint(
        str(config), str(checkpoint), str(tmp_path / 'out'), input_size=(32, 32), verbose=False)
    assert Config.fromfile(result.deploy_config).model.backbone.conv_cfg is None
    assert result.input_size_source == '--input-size'
    assert result.max_rel_error < RTOL


def _dbb_detector(tmp_path, norm="dict(type='BN', requires_grad=True)"):
    """The tiny detector with a stock mmdet ResNet-18 whose 3x3 convs are DBB, its backbone
    trained one step after ``randomise``; (config, checkpoint)."""
    config = tmp_path / 'dbb.py'
    text = configs.DETECTOR.replace("type='OREPAResNet',",
                                    "type='ResNet', conv_cfg=dict(type='DBB'),")
    config.write_text(
        text.replace("norm_cfg=dict(type='BN', requires_grad=True)", f'norm_cfg={norm}'))
    torch.manual_seed(5)
    model = randomise(build(config), seed=5)
    model.backbone.train()
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.01)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    sum(f.mean() for f in model.backbone(x)).backward()
    optimizer.step()
    model.eval()
    checkpoint = tmp_path / 'dbb.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    return config, checkpoint, model


def test_dbb_in_a_stock_resnet_deploys_with_its_biases_folded_into_the_bns(tmp_path):
    """DBB bakes into convs with a bias; mmdet's ResNet has none: each bias goes into the BN
    after its conv (exact), deploy.pth loads strictly into the stock ResNet."""
    config, checkpoint, model = _dbb_detector(tmp_path)
    result = reparameterize_checkpoint(
        str(config), str(checkpoint), str(tmp_path / 'out'), verbose=False)
    assert result.num_reparameterized == 16  # every 3x3 block conv of ResNet-18
    assert result.max_rel_error < DEFAULT_RTOL  # float64, every output
    artefact = [e for e in result.errors if e.name == ARTEFACT_ROW]
    assert artefact and artefact[0].gated and artefact[0].rel < ARTEFACT_RTOL
    deployed = Config.fromfile(result.deploy_config).model.backbone
    assert deployed.type == 'ResNet' and deployed.get('conv_cfg') is None
    stock = build(result.deploy_config)
    state = torch.load(result.deploy_checkpoint, weights_only=True)['state_dict']
    stock.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for a, b in zip(stock.backbone(x), model.backbone(x)):
            assert rel_err(a, b) < FLOAT32_RTOL


def test_dbb_bias_with_no_bn_after_it_is_refused_in_one_sentence(tmp_path, capsys):
    config, checkpoint, _ = _dbb_detector(tmp_path, norm="dict(type='GN', num_groups=2)")
    out = tmp_path / 'out'
    code, _, err = run_main([config, checkpoint, '--out', out], capsys)
    assert_refused(
        code, err, EXIT_BAD_INPUT, 'backbone.layer1.0.conv1', 'no BatchNorm follows', out_dir=out)


def test_runner_checkpoint_with_logs_and_numpy_meta(cases, tmp_path):
    """A checkpoint as mmengine's Runner writes it (message hub with HistoryBuffers, optimizer,
    numpy values in meta) loads through mmengine's loader; deploy.pth loads weights-only."""
    import numpy as np
    from mmengine.logging import MessageHub
    case = cases['classifier']
    hub = MessageHub.get_instance('reparam_runner_checkpoint')
    hub.update_scalar('train/loss', 0.5)
    checkpoint = dict(
        meta=dict(epoch=2, iter=10, seed=np.int64(3), lr=np.float32(0.1), cfg='model = ...'),
        state_dict=case.model.state_dict(),
        message_hub=hub.state_dict(),
        optimizer=dict(state={}, param_groups=[dict(lr=0.1, params=[0, 1])]))
    path = tmp_path / 'epoch_2.pth'
    torch.save(checkpoint, path)
    result = reparameterize_checkpoint(case.config, str(path), str(tmp_path / 'out'), verbose=False)
    saved = torch.load(result.deploy_checkpoint, weights_only=True)
    assert set(saved) == {'meta', 'state_dict'}
    assert saved['meta']['seed'] == 3 and type(saved['meta']['seed']) is int
    assert abs(saved['meta']['lr'] - 0.1) < 1e-6 and saved['meta']['cfg'] == 'model = ...'


@pytest.mark.parametrize(
    'pipeline,expected',
    [
        # mmdet: Resize(scale=(w, h), keep_ratio) -> (h, w)
        ([
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(1333, 800), keep_ratio=True),
            dict(type='PackDetInputs')
        ], (800, 1333)),
        # mmseg ADE20K
        ([
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(2048, 512), keep_ratio=True),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs')
        ], (512, 2048)),
        # mmpretrain ImageNet: the final crop wins
        ([
            dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=256, edge='short'),
            dict(type='CenterCrop', crop_size=224),
            dict(type='PackInputs')
        ], (224, 224)),
        # test-time augmentation: the first choice of each step
        ([
            dict(type='LoadImageFromFile'),
            dict(
                type='TestTimeAug',
                transforms=[[
                    dict(type='Resize', scale=(640, 480)),
                    dict(type='Resize', scale=(320, 240))
                ], [dict(type='PackDetInputs')]])
        ], (480, 640)),
    ])
def test_input_size_comes_from_the_test_pipeline(pipeline, expected):
    from orepa_mm.apis.verification import config_input_size
    wrapped = dict(type='RepeatDataset', times=2, dataset=dict(type='X', pipeline=pipeline))
    cfg = Config(dict(test_dataloader=dict(dataset=wrapped)))
    assert config_input_size(cfg) == (expected, 'test_dataloader pipeline')
    assert config_input_size(Config(dict(crop_size=(40, 50))))[0] == (40, 50)
    assert config_input_size(Config(dict()))[1].startswith('fallback')
