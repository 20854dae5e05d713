"""The authors' ImageNet checkpoints -> orepa_mm backbone state dicts.

The published ``.pth.tar`` files hold ``{'state_dict': {'module.<key>': tensor}}`` for the
authors' own ResNet / RepVGG module trees (``stage0`` .. ``stage4``, ``linear``). This module
infers the architecture from the keys, renames every tensor to the OpenMMLab ResNet / RepVGG
layout with orepa_mm's branch names, checks the result against a freshly built backbone of that
architecture (every key, every shape), and reports what it mapped and dropped.
Nothing here touches files: ``tools/convert_official_checkpoint.py`` does the I/O.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from ..cnn.kernels import frequency_prior, grouped_identity
from ..utils.checkpoint_io import unwrap_state_dict

# The authors' branch-parameter names -> orepa_mm's (OREPAConv2d / OREPAConv1x1).
_KXK = {
    'origin': 'origin',
    'avg_conv': 'avg_1x1',
    'pfir_conv': 'prior_1x1',
    '1x1_kxk_idconv1': 'expand_1x1_residual',
    '1x1_kxk_conv2': 'expand_kxk',
    '1x1': 'conv_1x1',
    'gconv_dw': 'dw_kxk',
    'gconv_pw': 'pw_1x1'
}
KXK_NAMES = {
    **{
        f'weight_orepa_{k}': v
        for k, v in _KXK.items()
    },
    **{
        f'weight_rbr_{k}': v
        for k, v in _KXK.items()
    }, 'vector': 'branch_scales'
}
ONE_BY_ONE_NAMES = {
    'weight_or1x1_origin': 'origin',
    'weight_or1x1_l2i_conv1': 'linear_first',
    'weight_or1x1_l2i_conv2': 'linear_second',
    'vector': 'branch_scales'
}
# Constant buffers the authors save; orepa_mm recomputes them (checked, then dropped).
CONSTANT_BUFFERS = ('weight_orepa_avg_avg', 'weight_rbr_avg_avg', 'id_tensor', 'weight_orepa_prior',
                    'weight_rbr_prior')

RESNET_DEPTHS = {
    ('basic', (2, 2, 2, 2)): 18,
    ('basic', (3, 4, 6, 3)): 34,
    ('bottleneck', (3, 4, 6, 3)): 50,
    ('bottleneck', (3, 4, 23, 3)): 101,
    ('bottleneck', (3, 8, 36, 3)): 152
}
REPVGG_STAGE_WIDTHS = (64, 128, 256, 512)


class OfficialCheckpointError(ValueError):
    """The file is not an authors' checkpoint this converter knows, or does not map fully."""


@dataclass
class ConversionReport:
    """What a conversion did, for the CLI and for tests."""
    architecture: dict
    mapped: int = 0
    dropped: List[str] = field(default_factory=list)
    added: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        arch = ', '.join(f'{k}={v}' for k, v in self.architecture.items())
        out = [f'architecture: {arch}', f'mapped tensors: {self.mapped}']
        if self.dropped:
            out.append(f'dropped ({len(self.dropped)}): ' + ', '.join(self.dropped))
        if self.added:
            out.append('added as zeros (dormant branches): ' + ', '.join(self.added))
        return out


def _blocks_per_stage(state, prefix_fmt) -> Tuple[int, ...]:
    counts = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state for m in [re.match(prefix_fmt.format(stage), k)] if m}
        counts.append(max(ids) + 1 if ids else 0)
    return tuple(counts)


def detect_architecture(state: Dict[str, Tensor]) -> dict:
    """``dict(family='resnet', depth=..., base_channels=...)`` or
    ``dict(family='repvgg', arch=<mmpretrain arch name>, base_channels=...)``."""
    if 'stage0.conv1.weight0.weight_orepa_origin' in state:
        kind = 'bottleneck' if any('.conv3.' in k for k in state) else 'basic'
        blocks = _blocks_per_stage(state, r'stage{}\.(\d+)\.')
        depth = RESNET_DEPTHS.get((kind, blocks))
        if depth is None:
            raise OfficialCheckpointError(
                f'it looks like an OREPA-ResNet with {kind} blocks {blocks}, which matches no '
                'published depth (18/34/50/101/152)')
        width = state['stage0.conv1.weight0.weight_orepa_origin'].shape[0]
        return dict(family='resnet', depth=depth, base_channels=width, stem_channels=width)
    if 'stage0.rbr_dense.weight_rbr_origin' in state:
        from mmpretrain.models.backbones import RepVGG
        blocks = _blocks_per_stage(state, r'stage{}\.(\d+)\.')
        widths = tuple(state[f'stage{s}.0.rbr_dense.weight_rbr_origin'].shape[0]
                       for s in range(1, 5))
        for name, setting in RepVGG.arch_settings.items():
            factors = setting['width_factor']
            base = round(widths[0] / factors[0])
            want = tuple(int(base * w / 64 * f) for w, f in zip(REPVGG_STAGE_WIDTHS, factors))
            if tuple(setting['num_blocks']) == blocks and want == widths and \
                    not setting.get('group_layer_map') and not setting.get('se_cfg'):
                return dict(family='repvgg', arch=name, base_channels=base)
        raise OfficialCheckpointError(
            f'it looks like an OREPA-VGG with blocks {blocks} and widths {widths}, which '
            'matches no ungrouped RepVGG architecture')
    raise OfficialCheckpointError(
        'it has neither an OREPA-ResNet stem (stage0.conv1.weight0.*) nor an OREPA-VGG stem '
        '(stage0.rbr_dense.*)')


def _ungroup_pointwise(pw: Tensor, groups: int) -> Tensor:
    """The authors' depthwise-separable branch reads pointwise row ``oc * g + c`` for output
    channel ``c * O/g + oc`` when groups > 1; orepa_mm reads row ``c * O/g + oc``."""
    if groups == 1:
        return pw
    o = pw.shape[0]
    return pw.reshape(o // groups, groups, *pw.shape[1:]).transpose(0, 1).reshape(pw.shape)


def _check_constant(key: str, value: Tensor):
    """The authors' saved constants must be the ones orepa_mm recomputes."""
    name = key.rsplit('.', 1)[-1]
    if name.endswith('avg_avg'):
        k = value.shape[-1]
        want = torch.full((k, k), 1.0 / k**2)
    elif name.endswith('prior'):
        want = frequency_prior(value.shape[0], value.shape[-1])
    else:  # id_tensor
        want = grouped_identity(value.shape[0], value.shape[1]).view_as(value)
    if not torch.allclose(value.float(), want, atol=1e-6):
        raise OfficialCheckpointError(f'its constant buffer {key} differs from the published '
                                      'formula')


def _rename_branches(module_prefix: str,
                     names: Dict[str, str],
                     src_prefix: str,
                     state,
                     out,
                     report,
                     vector_rows=None):
    """Copy the branch tensors of one authors' block into ``out`` under ``module_prefix``."""
    groups = 1
    origin = state.get(src_prefix + 'weight_orepa_origin',
                       state.get(src_prefix + 'weight_rbr_origin'))
    dw = state.get(src_prefix + 'weight_orepa_gconv_dw')
    if origin is not None and dw is not None:
        groups = (dw.shape[0] // 8) // origin.shape[1]
    for src, dst in names.items():
        if src_prefix + src not in state:
            continue
        value = state[src_prefix + src]
        if dst == 'pw_1x1':
            value = _ungroup_pointwise(value, groups)
        if dst == 'branch_scales' and vector_rows is not None and value.shape[0] > vector_rows:
            report.dropped.append(f'{src_prefix}vector[{vector_rows}:] (unused row)')
            value = value[:vector_rows]
        out[module_prefix + dst] = value
        report.mapped += 1


def _convert_resnet(state, report) -> Dict[str, Tensor]:
    out = OrderedDict()
    for key in state:
        m = re.match(r'stage0\.conv1\.weight(\d+)\.', key)
        if m and key.endswith('weight_orepa_origin'):
            _rename_branches(f'conv1.stem_layers.{m.group(1)}.', KXK_NAMES, m.group(0), state, out,
                             report)
        m = re.match(r'stage(\d)\.(\d+)\.(conv\d|shortcut)\.', key)
        if not m or '.bn.' in key:
            continue
        stage, block, conv = m.groups()
        dst = f'layer{stage}.{block}.' + ('downsample.0.' if conv == 'shortcut' else f'{conv}.')
        if key.endswith('weight_orepa_origin'):
            _rename_branches(dst, KXK_NAMES, m.group(0), state, out, report)
        elif key.endswith('weight_or1x1_origin'):
            _rename_branches(dst, ONE_BY_ONE_NAMES, m.group(0), state, out, report)
        elif key == m.group(0) + 'conv.weight':  # plain BasicBlock shortcut
            out[dst + 'weight'] = state[key]
            report.mapped += 1
    for key, value in state.items():
        m = re.match(r'stage0\.conv1\.bn\.(.+)', key) or \
            re.match(r'stage(\d)\.(\d+)\.(conv\d|shortcut)\.bn\.(.+)', key)
        if not m:
            continue
        if key.startswith('stage0'):
            out['bn1.' + m.group(1)] = value
        else:
            stage, block, conv, leaf = m.groups()
            norm = 'downsample.1' if conv == 'shortcut' else f'bn{conv[-1]}'
            out[f'layer{stage}.{block}.{norm}.{leaf}'] = value
        report.mapped += 1
    stem = out['conv1.stem_layers.0.origin']
    width = out['bn1.weight'].shape[0]
    out['conv1.origin'] = stem.new_zeros(width, stem.shape[1], 7, 7)
    out['conv1.origin_scale'] = stem.new_zeros(width)
    report.added += ['conv1.origin', 'conv1.origin_scale']
    return out


def _convert_repvgg(state, report) -> Dict[str, Tensor]:
    out = OrderedDict()
    for key, value in state.items():
        m = re.match(r'(stage0|stage(\d)\.(\d+))\.(rbr_dense|rbr_1x1|rbr_identity)\.', key)
        if not m:
            continue
        block = 'stem.' if m.group(1) == 'stage0' else f'stage_{m.group(2)}.{m.group(3)}.'
        branch, rest = m.group(4), key[len(m.group(0)):]
        if branch == 'rbr_dense' and rest == 'weight_rbr_origin':
            _rename_branches(
                block + 'branch_3x3.conv.',
                KXK_NAMES,
                m.group(0),
                state,
                out,
                report,
                vector_rows=5)
        elif branch == 'rbr_dense' and rest.startswith('bn.'):
            out[block + 'branch_3x3.norm.' + rest[3:]] = value
            report.mapped += 1
        elif branch == 'rbr_1x1':
            leaf = 'conv.' + rest[5:] if rest.startswith('conv.') else 'norm.' + rest[3:]
            out[block + 'branch_1x1.' + leaf] = value
            report.mapped += 1
        elif branch == 'rbr_identity':
            out[block + 'branch_norm.' + rest] = value
            report.mapped += 1
    return out


def build_target_backbone(architecture: dict):
    """A freshly built orepa_mm backbone of the inferred architecture (key/shape reference)."""
    if architecture['family'] == 'resnet':
        from ..models.backbones.for_mmpretrain import OREPAResNet
        return OREPAResNet(
            depth=architecture['depth'],
            base_channels=architecture['base_channels'],
            stem_channels=architecture['stem_channels'])
    from ..models.backbones.orepa_vgg import OREPAVGG
    return OREPAVGG(arch=architecture['arch'], base_channels=architecture['base_channels'])


def convert_official_state_dict(checkpoint) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Map an authors' checkpoint (dict as loaded) to an orepa_mm backbone state dict.

    Raises :class:`OfficialCheckpointError` (a one-clause reason) when the file is not an
    authors' OREPA checkpoint or does not map completely onto the inferred backbone.
    """
    state = unwrap_state_dict(checkpoint)
    if state is None:
        raise OfficialCheckpointError('it holds no state dict of tensors')
    architecture = detect_architecture(state)
    report = ConversionReport(architecture)
    for key, value in state.items():
        if key.rsplit('.', 1)[-1] in CONSTANT_BUFFERS:
            _check_constant(key, value)
    convert = _convert_resnet if architecture['family'] == 'resnet' else _convert_repvgg
    out = convert(state, report)

    consumed_prefixes = ('linear.', )
    dropped_head = [k for k in state if k.startswith(consumed_prefixes)]
    report.dropped = [f'{k} (classifier head)' for k in dropped_head] + report.dropped
    constants = [k for k in state if k.rsplit('.', 1)[-1] in CONSTANT_BUFFERS]
    if constants:
        report.dropped.append(f'{len(constants)} constant buffers (recomputed, checked equal)')
    accounted = report.mapped + len(dropped_head) + len(constants)
    if accounted != len(state):
        raise OfficialCheckpointError(
            f'{len(state) - accounted} of its {len(state)} tensors match no known parameter')

    target = build_target_backbone(architecture).state_dict()
    missing = [k for k in target if k not in out]
    unexpected = [k for k in out if k not in target]
    wrong = [
        f'{k} {tuple(out[k].shape)} != {tuple(v.shape)}' for k, v in target.items()
        if k in out and out[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        detail = '; '.join(
            filter(None, [
                missing and f'missing {missing[:3]}', unexpected and f'unexpected {unexpected[:3]}',
                wrong and f'shape {wrong[:3]}'
            ]))
        raise OfficialCheckpointError(f'it does not map completely onto the inferred '
                                      f'backbone ({detail})')
    return OrderedDict((k, out[k]) for k in target), report
