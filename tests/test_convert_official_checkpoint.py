"""tools/convert_official_checkpoint.py: what it writes, and what it refuses."""
import os
import runpy
import sys

import pytest
import torch

from tests.official_reference import random_official_checkpoint, reference_path

TOOL = os.path.join(os.path.dirname(__file__), '..', 'tools', 'convert_official_checkpoint.py')


def run_tool(*args):
    argv = sys.argv
    sys.argv = [TOOL, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(TOOL, run_name='__main__')
    finally:
        sys.argv = argv
    return exit_info.value.code


def test_converts_the_fixture_and_reports(tmp_path, capsys):
    dst = tmp_path / 'out' / 'r18.pth'
    assert run_tool(reference_path('official_resnet18_w0.25.pth.tar'), dst) == 0
    out = capsys.readouterr().out
    assert 'depth=18' in out and 'linear.weight (classifier head)' in out
    checkpoint = torch.load(dst, weights_only=True)
    assert 'conv1.stem_layers.0.branch_scales' in checkpoint['state_dict']
    assert not any(k.startswith(('module.', 'linear')) for k in checkpoint['state_dict'])
    assert os.listdir(dst.parent) == ['r18.pth']  # no temporary file left


def _refused(tmp_path, capsys, src, fragment):
    dst = tmp_path / 'dst.pth'
    assert run_tool(src, dst) == 2  # bad input, as in every tool (orepa_mm.utils.errors)
    err = capsys.readouterr().err
    assert fragment in err and err.count('\n') == 1, err
    assert not dst.exists() and not any(p.name.startswith('.tmp') for p in tmp_path.iterdir())


def test_refuses_a_file_it_does_not_recognise(tmp_path, capsys):
    src = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.conv.weight': torch.zeros(1)}}, src)
    _refused(tmp_path, capsys, src, 'is not a convertible OREPA checkpoint')


def test_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    checkpoint = random_official_checkpoint('official_resnet18_keys.json')
    del checkpoint['state_dict']['module.stage3.1.conv2.weight_orepa_1x1']
    src = tmp_path / 'partial.pth.tar'
    torch.save(checkpoint, src)
    _refused(tmp_path, capsys, src, 'does not map completely')


def test_refuses_unknown_extra_tensors(tmp_path, capsys):
    checkpoint = random_official_checkpoint('official_repvgg_a0_keys.json')
    checkpoint['state_dict']['module.stage1.0.extra'] = torch.zeros(3)
    src = tmp_path / 'extra.pth.tar'
    torch.save(checkpoint, src)
    _refused(tmp_path, capsys, src, 'match no known parameter')


def test_refuses_a_corrupt_or_missing_file(tmp_path, capsys):
    src = tmp_path / 'truncated.pth.tar'
    data = open(reference_path('official_resnet18_w0.25.pth.tar'), 'rb').read()
    src.write_bytes(data[:len(data) // 2])
    _refused(tmp_path, capsys, src, 'cannot read')
    _refused(tmp_path, capsys, tmp_path / 'missing.pth.tar', 'does not exist')


def test_refuses_an_unwritable_destination(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert run_tool(reference_path('official_resnet18_w0.25.pth.tar'), blocker / 'r18.pth') == 2
    assert 'cannot write' in capsys.readouterr().err
