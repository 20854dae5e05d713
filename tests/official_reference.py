"""Test oracle: the authors' OREPA models computed straight from an official-format state dict.

Written from the published formulas and module layout (../shared/reference/OREPA.md), with no
orepa_mm code, so that converter + backbone are checked against an independent computation.
Also builds random official-format checkpoints from the published key lists at a reduced width.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'official')


def reference_path(name: str) -> str:
    return os.path.join(REFERENCE, name)


# -- random official-format checkpoints ----------------------------------------------------------
def _prior(o, k=3):
    d = torch.empty(o, k, k)
    half = o / 2
    for i in range(o):
        for h in range(3):
            for w in range(3):
                d[i, h, w] = (
                    math.cos(math.pi * (h + 0.5) * (i + 1) /
                             3) if i < half else math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3))
    return d


def random_official_checkpoint(keys_json: str, divisor: int = 4, seed: int = 0):
    """Random tensors for every key of the published list, channel dims (>= 32) / divisor.

    Constant buffers get their true values; BN statistics and scale vectors are random so a
    wrong mapping cannot pass. Returned in the authors' exact format (DataParallel prefixes).
    """
    g = torch.Generator().manual_seed(seed)
    shapes = json.load(open(reference_path(keys_json)))
    state = {}
    for key, shape in shapes.items():
        shape = [d // divisor if d >= 32 else d for d in shape]
        leaf = key.rsplit('.', 1)[-1]
        if leaf.endswith('avg_avg'):
            value = torch.full(shape, 1.0 / 9)
        elif leaf.endswith('prior'):
            value = _prior(shape[0])
        elif leaf == 'id_tensor':
            value = torch.zeros(shape)
            value[torch.arange(shape[0]), torch.arange(shape[0]) % shape[1]] = 1
        elif leaf == 'num_batches_tracked':
            value = torch.tensor(100)
        elif leaf == 'running_var':
            value = torch.rand(shape, generator=g) + 0.5
        elif leaf in ('running_mean', 'bias'):
            value = torch.randn(shape, generator=g) * 0.1
        elif leaf == 'weight' and len(shape) == 1:  # BN gamma
            value = torch.rand(shape, generator=g) + 0.5
        elif leaf == 'vector':
            value = torch.rand(shape, generator=g) * 0.5
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state['module.' + key] = value
    return {'state_dict': state}


# -- the authors' kernels ------------------------------------------------------------------------
def _get(sd, prefix, name):
    return sd[prefix + name]


def orepa_kernel(sd, p, tag='orepa'):
    """OREPA / OREPA_3x3_RepVGG weight_gen (groups = 1) as published."""
    w = lambda n: sd[f'{p}weight_{tag}_{n}']  # noqa: E731
    v = sd[p + 'vector']
    origin = w('origin')
    o, i, k, _ = origin.shape
    out = torch.einsum('oihw,o->oihw', origin, v[0])
    out += torch.einsum('oi,hw,o->oihw',
                        w('avg_conv')[:, :, 0, 0], sd[f'{p}weight_{tag}_avg_avg'], v[1])
    out += torch.einsum('oi,ohw,o->oihw',
                        w('pfir_conv')[:, :, 0, 0], sd[f'{p}weight_{tag}_prior'], v[2])
    first = (w('1x1_kxk_idconv1') + sd[p + 'id_tensor'])[:, :, 0, 0]
    out += torch.einsum('ti,othw,o->oihw', first, w('1x1_kxk_conv2'), v[3])
    row = 4
    if f'{p}weight_{tag}_1x1' in sd:
        out += torch.einsum('oihw,o->oihw', F.pad(w('1x1'), [1, 1, 1, 1]), v[4])
        row = 5
    dw, pw = w('gconv_dw'), w('gconv_pw')[:, :, 0, 0]
    dsc = torch.einsum('itxy,oit->oixy', dw.view(i, 8, k, k), pw.view(o, i, 8))
    return out + torch.einsum('oihw,o->oihw', dsc, v[row])


def orepa_1x1_kernel(sd, p):
    v = sd[p + 'vector']
    first = sd[p + 'weight_or1x1_l2i_conv1'][:, :, 0, 0]
    second = sd[p + 'weight_or1x1_l2i_conv2'][:, :, 0, 0]
    k = sd[p + 'weight_or1x1_origin'] * v[0].view(-1, 1, 1, 1)
    return k + (second @ first * v[1].view(-1, 1))[..., None, None]


def large_kernel(sd, p, layers=3):
    weight = orepa_kernel(sd, f'{p}weight0.').transpose(0, 1)
    for n in range(1, layers):
        weight = F.conv2d(weight, orepa_kernel(sd, f'{p}weight{n}.'), padding=2)
    return weight.transpose(0, 1)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'],
                        sd[p + 'bias'], False, 0.0, 1e-5)


def _conv_bn(x, sd, p, stride=1, padding=None):
    if p + 'weight_orepa_origin' in sd:
        kernel = orepa_kernel(sd, p)
    elif p + 'weight_or1x1_origin' in sd:
        kernel = orepa_1x1_kernel(sd, p)
    else:
        kernel = sd[p + 'conv.weight']
    padding = kernel.shape[-1] // 2 if padding is None else padding
    return _bn(F.conv2d(x, kernel, stride=stride, padding=padding), sd, p + 'bn.')


def resnet_stage_outputs(sd, x):
    """The authors' ResNet in eval mode: [stem after maxpool, stage1, ..., stage4]."""
    sd = {k[len('module.'):]: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    stem = F.conv2d(x, large_kernel(sd, 'stage0.conv1.'), stride=2, padding=3)
    out = F.max_pool2d(F.relu(_bn(stem, sd, 'stage0.conv1.bn.')), 3, 2, 1)
    outs = [out]
    bottleneck = 'stage1.0.conv3.bn.weight' in sd
    for s in range(1, 5):
        b = 0
        while f'stage{s}.{b}.conv1.bn.weight' in sd:
            p = f'stage{s}.{b}.'
            stride = 2 if (s > 1 and b == 0) else 1
            shortcut = out
            if p + 'shortcut.bn.weight' in sd:
                shortcut = _conv_bn(out, sd, p + 'shortcut.', stride=stride, padding=0)
            if bottleneck:
                y = F.relu(_conv_bn(out, sd, p + 'conv1.', padding=0))
                y = F.relu(_conv_bn(y, sd, p + 'conv2.', stride=stride))
                y = _conv_bn(y, sd, p + 'conv3.', padding=0)
            else:
                y = F.relu(_conv_bn(out, sd, p + 'conv1.', stride=stride))
                y = _conv_bn(y, sd, p + 'conv2.')
            out = F.relu(y + shortcut)
            b += 1
        outs.append(out)
    return outs


def repvgg_stage_outputs(sd, x):
    """The authors' OREPA-VGG in eval mode: [stage0, stage1, ..., stage4]."""
    sd = {k[len('module.'):]: v.double() if v.is_floating_point() else v for k, v in sd.items()}

    def block(x, p, stride):
        kernel = orepa_kernel(sd, p + 'rbr_dense.', tag='rbr')
        y = _bn(F.conv2d(x, kernel, stride=stride, padding=1), sd, p + 'rbr_dense.bn.')
        y = y + _bn(
            F.conv2d(x, sd[p + 'rbr_1x1.conv.weight'], stride=stride), sd, p + 'rbr_1x1.bn.')
        if p + 'rbr_identity.weight' in sd:
            y = y + _bn(x, sd, p + 'rbr_identity.')
        return F.relu(y)

    out = block(x.double(), 'stage0.', 2)
    outs = [out]
    for s in range(1, 5):
        b = 0
        while f'stage{s}.{b}.rbr_dense.bn.weight' in sd:
            out = block(out, f'stage{s}.{b}.', 2 if b == 0 else 1)
            b += 1
        outs.append(out)
    return outs
