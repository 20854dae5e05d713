"""Train-time checkpoint -> verified deployable checkpoint + config that need no orepa_mm.

:func:`reparameterize_checkpoint` is the whole conversion, used by ``tools/reparameterize.py``
and callable from Python (demos, notebooks):

1. read the config and the checkpoint (orepa_mm's safe runner-checkpoint loader,
   :func:`orepa_mm.utils.checkpoint_io.read_checkpoint`: a malicious file is refused for safety,
   a broken one named as such), pick the weights (EMA when present, see
   :func:`~orepa_mm.utils.checkpoint_io.select_weights`) and check they fit the train-time
   model key for key;
2. bake every re-param layer into a stock conv (float64, :mod:`orepa_mm.deploy`) and let the
   orepa_mm backbones finish their own deploy step (RepVGG's branch fusion); a baked conv bias
   the stock model has no place for (DBB in a stock ResNet) is folded into the BN after it
   (:mod:`orepa_mm.apis.bias_fold`);
3. build the stock model from :func:`~orepa_mm.apis.deploy_config.deploy_config` (dumped and
   re-read, i.e. exactly the file that will be written), load the baked weights strictly,
   serialise its state dict and load those bytes back into a fresh stock model: the artefact;
4. run the train-time model, the float64 conversion and the artefact on the same input and
   compare every output (:mod:`.deploy_gate`, over :mod:`.verification`): the
   conversion gated in float64 at ``rtol``, the artefact's float32 weights (run in float64)
   at ``ARTEFACT_RTOL``; optionally export backbone (+neck) to ONNX and check onnxruntime;
5. only then write ``deploy.pth``, ``deploy_config.py`` (and ``deploy_backbone.onnx``),
   staged in a fresh temporary directory beside them and moved into place together
   (:mod:`orepa_mm.utils.atomic_write`; every name was checked before any work);
   ``deploy.pth`` is read back from disk first and must hold the verified tensors bit for bit.

Every refusal is a :class:`ReparameterizeError` whose message is one sentence and whose
``exit_code`` is what the CLI returns; nothing is written when one is raised.
"""
import copy
import datetime
import io
import os.path as osp
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from ..deploy import has_own_deploy_step, reparam_sites, reparameterize_model
from ..utils.atomic_write import OutputSet, check_writable_dir, write_files
from ..utils.checkpoint_io import read_checkpoint, select_weights
from ..utils.config_io import build_model, read_config, reload_config
from ..utils.errors import (AlreadyDeployedError, ReparameterizeError, VerificationError,
                            first_line, refusals_as)
from ..utils.text_table import format_rows, human_number, log_step
from .bias_fold import BiasFoldError, fold_conv_biases
from .deploy_config import deploy_config
from .deploy_gate import (ARTEFACT_ROW, ARTEFACT_RTOL, DEFAULT_RTOL, DEPLOY_CHECKPOINT,
                          DEPLOY_CONFIG, DEPLOY_ONNX, FLOAT32_RTOL, export_and_check_onnx,
                          format_errors, verify_deployment)
from .verification import (OutputError, complexity, config_input_size, deterministic_image,
                           library_of, make_batch)

#: Where mmdeploy keeps the ONNX Runtime deploy config of each task (mmdeploy >= 1.0).
MMDEPLOY_CONFIGS = {
    'mmdet': 'configs/mmdet/detection/detection_onnxruntime_dynamic.py',
    'mmseg': 'configs/mmseg/segmentation_onnxruntime_dynamic.py',
    'mmpretrain': 'configs/mmpretrain/classification_onnxruntime_dynamic.py',
}


def _listing(keys: Sequence[str], limit: int = 3) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


# -- result ----------------------------------------------------------------------------------
@dataclass
class ReparameterizeResult:
    """What a conversion produced and measured."""
    config: str
    checkpoint: str
    out_dir: str
    deploy_checkpoint: str
    deploy_config: str
    library: str
    ema_used: bool
    weights: str  # which weights were used, in words
    input_size: Tuple[int, int]
    input_size_source: str
    rtol: float
    num_reparameterized: int
    errors: List[OutputError] = field(default_factory=list)
    onnx_file: Optional[str] = None
    onnx_errors: List[OutputError] = field(default_factory=list)
    train_cost: Dict[str, float] = field(default_factory=dict)
    deploy_cost: Dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        gated = [e.rel for e in self.errors if e.gated and e.tolerance is None]
        return max(gated) if gated else 0.0

    def mmdeploy_command(self, image: str = 'demo.jpg') -> str:
        """The mmdeploy (>= 1.0, run from its repository root) call that exports this model."""
        deploy_cfg = MMDEPLOY_CONFIGS.get(self.library, MMDEPLOY_CONFIGS['mmdet'])
        work_dir = osp.join(self.out_dir, 'mmdeploy')
        return (f'python tools/deploy.py {deploy_cfg} {self.deploy_config} '
                f'{self.deploy_checkpoint} {image} --work-dir {work_dir} --device cpu '
                '--dump-info')

    def table(self) -> str:
        """The closing summary: costs, verification errors, output paths."""
        h, w = self.input_size
        rows = [('', 'train-time', 'deployed')]
        for key, label in (('params', 'parameters (model)'), ('feature_params',
                                                              'parameters (backbone+neck)'),
                           ('flops', f'FLOPs (backbone+neck, {h}x{w})')):
            rows.append((label, human_number(self.train_cost.get(key)),
                         human_number(self.deploy_cost.get(key))))
        lines = format_rows(rows)
        lines.append('')
        lines.extend(format_errors(self.errors + self.onnx_errors, self.rtol))
        lines.append('')
        lines.append(f'weights: {self.weights}')
        lines.append(f'input: 1x3x{h}x{w} ({self.input_size_source})')
        lines.append(f're-parameterized layers: {self.num_reparameterized}')
        outputs = [self.deploy_checkpoint, self.deploy_config]
        if self.onnx_file:
            outputs.append(self.onnx_file)
        lines.extend(f'wrote {path}' for path in outputs)
        return '\n'.join(lines)


def _check_keys(model: nn.Module, state: Dict[str, torch.Tensor], deployed_keys: Sequence[str],
                checkpoint: str, config: str) -> None:
    """Refuse a checkpoint that does not fit the train-time model exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing and deployed_keys and all(k in state for k in deployed_keys):
        raise AlreadyDeployedError(f'checkpoint {checkpoint} is already re-parameterized (its '
                                   'keys are those of the deployed model); use it as is with '
                                   'the deployed config.')
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'{len(missing)} keys missing ({_listing(missing)})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected ({_listing(unexpected)})')
        raise ReparameterizeError(f'checkpoint {checkpoint} does not match config {config}: ' +
                                  ', '.join(parts) + '.')
    wrong = [
        f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ReparameterizeError(f'checkpoint {checkpoint} does not match config {config}: '
                                  f'{len(wrong)} tensors have other shapes ({_listing(wrong)}).')


def _dump_text(cfg: Config, source: str) -> str:
    header = ('# Deployed (re-parameterized) model written by orepa_mm tools/reparameterize.py\n'
              f'# from {osp.abspath(source)}; weights: {DEPLOY_CHECKPOINT}. Stock modules only:\n'
              '# inference, tools/test.py and mmdeploy need no `import orepa_mm`.\n')
    return header + cfg.dump()


# -- writing -----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """``value`` made of what ``torch.load(weights_only=True)`` accepts (numpy -> python)."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return value
    for plain in (bool, int, float, str):  # subclasses (TorchVersion, IntEnum) are not allowed
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _save_checkpoint(obj: dict) -> Callable[[str], None]:

    def write(path: str) -> None:
        torch.save(obj, path)
        # What stock mmengine does under torch >= 2.6: must load without orepa_mm.
        torch.load(path, map_location='cpu', weights_only=True)

    return write


def _save_text(text: str) -> Callable[[str], None]:

    def write(path: str) -> None:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)

    return write


def write_deployment(out_dir: str,
                     state: Dict[str, torch.Tensor],
                     meta: dict,
                     config_text: str,
                     extra: Optional[Dict[str, Callable[[str], None]]] = None) -> Dict[str, str]:
    """Write ``deploy.pth`` (``meta`` + ``state``) and ``deploy_config.py`` (``config_text``),
    plus ``extra`` ``{name: write(path)}``, into ``out_dir`` all or nothing; returns
    ``{name: path}``. ``deploy.pth`` is read back from disk and must hold ``state`` bit for bit;
    a stale ``deploy_backbone.onnx`` of an earlier run is removed unless ``extra`` writes it."""
    writers = {
        DEPLOY_CHECKPOINT:
        _verified_on_disk(
            _save_checkpoint(dict(meta=_plain(copy.deepcopy(meta)), state_dict=state)), state),
        DEPLOY_CONFIG:
        _save_text(config_text),
        **(extra or {}),
    }
    targets = {osp.join(out_dir, name): write for name, write in writers.items()}
    try:
        with refusals_as(ReparameterizeError):
            finals = write_files(
                targets,
                flags={path: '--out'
                       for path in targets},
                optional=[osp.join(out_dir, DEPLOY_ONNX)],
                fix='pass --out another directory')
    except OSError as exc:
        raise ReparameterizeError(f'cannot write to {out_dir} '
                                  f'({exc.strerror or first_line(exc)}).') from exc
    return {name: finals[path] for name, path in zip(writers, targets)}


def _check_outputs(out_dir: str) -> None:
    """Every name the run will write (or replace) in ``out_dir``, checked before any work: a
    directory or an immutable file in place of ``deploy_config.py`` is found here, not after
    ``deploy.pth`` was replaced."""
    if not out_dir.strip():
        raise ReparameterizeError('--out is empty; name the output directory.')
    outputs = OutputSet('pass --out another directory')
    for name in (DEPLOY_CHECKPOINT, DEPLOY_CONFIG, DEPLOY_ONNX):
        outputs.add(osp.join(out_dir, name), '--out')
    outputs.check()


# -- the conversion ----------------------------------------------------------------------------
def _check_args(device: str, input_size, rtol: float) -> None:
    if device not in ('cpu', 'cuda') and not device.startswith('cuda:'):
        raise ReparameterizeError(f'device must be cpu or cuda, got {device!r}.')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ReparameterizeError('device cuda was asked for but CUDA is not available; use '
                                  '--device cpu.')
    if input_size is not None and (len(input_size) != 2 or any(not isinstance(v, int) or v <= 0
                                                               for v in input_size)):
        raise ReparameterizeError(f'input size must be two positive integers H W, got '
                                  f'{input_size!r}.')
    if not rtol > 0:
        raise ReparameterizeError(f'rtol must be positive, got {rtol!r}.')


def reparameterize_checkpoint(config: str,
                              checkpoint: str,
                              out_dir: str,
                              use_ema: Optional[bool] = None,
                              device: str = 'cpu',
                              input_size: Optional[Tuple[int, int]] = None,
                              rtol: float = DEFAULT_RTOL,
                              export_onnx: bool = False,
                              verbose: bool = True) -> ReparameterizeResult:
    """Convert a train-time checkpoint into a verified deployable one (see module docstring).

    Args:
        config: train-time config (a detector, segmentor or classifier with orepa_mm layers).
        checkpoint: its checkpoint (runner checkpoint or bare state dict).
        out_dir: where ``deploy.pth``, ``deploy_config.py`` (and ``deploy_backbone.onnx``) go.
        use_ema: True: require and use EMA weights; False: the raw weights; None: EMA if any.
        device: 'cpu' or 'cuda' for building and verifying.
        input_size: (H, W) of the verification input; default: the config's test size.
        rtol: largest relative error of the conversion, any output compared in float64 (the
            written float32 weights are gated at ARTEFACT_RTOL, outputs that cannot run in
            float64 at FLOAT32_RTOL, onnxruntime at ONNX_RTOL: :mod:`.deploy_gate`).
        export_onnx: also export backbone (+ neck) to ONNX and check it with onnxruntime.
        verbose: log the steps, the progress bar and the comparison.

    Raises:
        ReparameterizeError: bad input (``exit_code`` 2); :class:`AlreadyDeployedError` (3);
            :class:`VerificationError` (4). Nothing is written in any of these cases.
    """
    _check_args(device, input_size, rtol)
    with refusals_as(ReparameterizeError):
        check_writable_dir(out_dir)
        _check_outputs(out_dir)
        cfg = read_config(config, 'pass the train-time config the checkpoint was trained with')
        ckpt = read_checkpoint(checkpoint)
        meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
        if isinstance(meta.get('reparameterized'), dict):
            source = meta['reparameterized'].get('source_checkpoint', 'a train-time checkpoint')
            raise AlreadyDeployedError(f'checkpoint {checkpoint} is already re-parameterized '
                                       f'(made from {source}); use it as is with its '
                                       'deploy_config.py.')
        model = build_model(cfg, device, 'train-time')
        if not any(reparam_sites(model)) and not any(map(has_own_deploy_step, model.modules())):
            raise ReparameterizeError(f'the model of config {config} has nothing to '
                                      're-parameterize (no OREPA/DBB conv and no orepa_mm '
                                      'backbone).')
        deployed_text, deployed_cfg = deployed_config_text(cfg, config)
        stock = build_model(deployed_cfg, device, 'deployed (stock)')
        state, ema_used, weights = select_weights(ckpt, checkpoint, use_ema)
    _check_keys(model, state, list(stock.state_dict()), checkpoint, config)
    model.load_state_dict(state, strict=True)
    model.eval()
    log_step(f'weights: {weights}', verbose)
    num_baked = _convert_into(stock, model, config, verbose)
    # Everything below runs on what deploy.pth will hold, read back from its bytes.
    written_state = _written_state(stock)
    stock = _artefact_model(deployed_cfg, written_state, device)

    if input_size is None:
        size, size_source = config_input_size(cfg)
    else:
        size, size_source = tuple(input_size), '--input-size'
    image = deterministic_image(size).to(device)
    log_step(f'verifying on a 1x3x{size[0]}x{size[1]} input ({size_source})', verbose)
    errors = verify_deployment(model, stock, _exact_copies(model, stock), image, rtol, verbose)
    inputs = make_batch(stock, image)['inputs']
    train_cost, deploy_cost = complexity(model, inputs), complexity(stock, inputs)

    onnx_errors: List[OutputError] = []
    with tempfile.TemporaryDirectory() as tmp:
        writers = {}
        if export_onnx:
            onnx_file = osp.join(tmp, DEPLOY_ONNX)
            onnx_errors = export_and_check_onnx(stock, inputs, onnx_file, errors, verbose)
            writers[DEPLOY_ONNX] = lambda path: shutil.copyfile(onnx_file, path)
        record = dict(
            tool='orepa_mm tools/reparameterize.py',
            orepa_mm_version=_version(),
            torch_version=str(torch.__version__),
            time=datetime.datetime.now().isoformat(timespec='seconds'),
            source_config=osp.abspath(config),
            source_checkpoint=osp.abspath(checkpoint),
            ema_used=ema_used,
            weights=weights,
            layers=num_baked,
            input_size=list(size),
            rtol=rtol,
            artefact_rtol=ARTEFACT_RTOL,
            float32_rtol=FLOAT32_RTOL,
            max_rel_error=max([e.rel for e in errors if e.gated and e.tolerance is None],
                              default=0.0),
            artefact_max_rel_error=max([e.rel for e in errors if e.name == ARTEFACT_ROW],
                                       default=None),
            float32_max_rel_error=max([
                e.rel for e in errors if e.name.startswith('float32') or e.tolerance == FLOAT32_RTOL
            ],
                                      default=None),
            onnx_max_rel_error=max([e.rel for e in onnx_errors], default=None),
            errors={e.name: e.as_dict()
                    for e in errors + onnx_errors},
        )
        new_meta = dict(meta, reparameterized=record)
        finals = write_deployment(out_dir, written_state, new_meta, deployed_text, writers)

    return ReparameterizeResult(
        config=config,
        checkpoint=checkpoint,
        out_dir=out_dir,
        deploy_checkpoint=finals[DEPLOY_CHECKPOINT],
        deploy_config=finals[DEPLOY_CONFIG],
        onnx_file=finals.get(DEPLOY_ONNX),
        library=library_of(stock),
        ema_used=ema_used,
        weights=weights,
        input_size=tuple(size),
        input_size_source=size_source,
        rtol=rtol,
        num_reparameterized=num_baked,
        errors=errors,
        onnx_errors=onnx_errors,
        train_cost=train_cost,
        deploy_cost=deploy_cost)


def deployed_config_text(cfg: Config, config: str) -> Tuple[str, Config]:
    """The text of ``deploy_config.py`` for the train-time ``cfg`` (read from ``config``) and
    the config read back from exactly that text."""
    try:
        text = _dump_text(deploy_config(cfg), config)
        return text, reload_config(text, DEPLOY_CONFIG)
    except Exception as exc:  # noqa: BLE001 - a value Config cannot dump, a failed re-import
        raise ReparameterizeError(f'cannot write a deployed config for {config} '
                                  f'({type(exc).__name__}: {first_line(exc)}).') from exc


def _baked(model: nn.Module, stock_keys: Sequence[str], progress: bool = False) -> nn.Module:
    """A copy of ``model`` with every re-param layer baked (float64 arithmetic, cast back to the
    model's dtype) and the conv biases the stock model has no place for folded into the BN
    after them (a DBB conv in a stock ResNet, see :mod:`orepa_mm.apis.bias_fold`)."""
    deployed = reparameterize_model(copy.deepcopy(model), progress=progress)
    try:
        fold_conv_biases(deployed, set(stock_keys))
    except BiasFoldError as exc:
        raise ReparameterizeError(f'cannot deploy into the stock model: {exc}.') from exc
    return deployed


def _convert_into(stock: nn.Module, model: nn.Module, config: str, verbose: bool) -> int:
    """Bake a copy of ``model`` and load it strictly into ``stock``; returns the layer count."""
    num_baked = len(list(reparam_sites(model)))
    log_step(f'baking {num_baked} re-param layers in float64', verbose)
    deployed = _baked(model, list(stock.state_dict()), progress=verbose)
    missing, unexpected = stock.load_state_dict(deployed.state_dict(), strict=False)
    if missing or unexpected:
        raise ReparameterizeError(
            f'the deployed config of {config} does not describe the re-parameterized model '
            f'(missing {_listing(list(missing)) or "none"}; unexpected '
            f'{_listing(list(unexpected)) or "none"}); is a backbone type missing from '
            'orepa_mm.apis.deploy_config?')
    stock.eval()
    return num_baked


def _written_state(stock: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict ``deploy.pth`` will hold, read back from its serialised bytes
    (``torch.save``, then ``torch.load(weights_only=True)`` as stock mmengine loads it; CPU
    tensors). The float32 gate runs on exactly these tensors, and the file is checked to hold
    them bit for bit once written (:func:`_verified_on_disk`)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in stock.state_dict().items()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location='cpu', weights_only=True)


def _artefact_model(deployed_cfg: Config, state: Dict[str, torch.Tensor], device: str) -> nn.Module:
    """What a user gets from ``deploy_config.py`` + ``deploy.pth``: a fresh stock model built
    from the deployed config, ``state`` loaded strictly. Nothing of the conversion's own model
    object (its buffers, its modules) reaches the gate."""
    with refusals_as(ReparameterizeError):
        artefact = build_model(deployed_cfg, device, 'deployed (stock)')
    artefact.load_state_dict(state, strict=True)
    artefact.eval()
    return artefact


def _differing(expected: Dict[str, torch.Tensor], actual: Any) -> List[str]:
    """Keys whose tensors are not identical (dtype, shape, bits) or present on one side only."""
    actual = actual if isinstance(actual, dict) else {}
    keys = sorted(set(expected) | set(actual))
    return [
        k for k in keys if k not in expected or not isinstance(actual.get(k), torch.Tensor)
        or actual[k].dtype != expected[k].dtype or actual[k].shape != expected[k].shape
        or not torch.equal(actual[k], expected[k])
    ]


def _verified_on_disk(write: Callable[[str], None],
                      state: Dict[str, torch.Tensor]) -> Callable[[str], None]:
    """``write``, then read the written file back from disk and refuse (nothing lands) unless
    its ``state_dict`` is exactly ``state``, the tensors the float32 gate ran on."""

    def write_and_check(path: str) -> None:
        write(path)
        saved = torch.load(path, map_location='cpu', weights_only=True)
        differing = _differing(state, saved.get('state_dict') if isinstance(saved, dict) else None)
        if differing:
            raise VerificationError(
                f'{DEPLOY_CHECKPOINT} as read back from disk does not hold the verified weights '
                f'({len(differing)} tensors differ: {_listing(differing)}); nothing written.')

    return write_and_check


def _exact_copies(model: nn.Module, stock: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """float64 copies of the train-time model and of the deployed one, the latter loaded with
    kernels baked in float64 and kept in float64 (no cast to the checkpoint's fp32)."""
    model64 = copy.deepcopy(model).double().eval()
    baked64 = _baked(model64, list(stock.state_dict()))
    stock64 = copy.deepcopy(stock).double()
    stock64.load_state_dict(baked64.state_dict(), strict=True)
    return model64, stock64.eval()


def _version() -> str:
    from .. import __version__
    return __version__
