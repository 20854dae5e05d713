"""orepa_mm.utils.data_check: which dataset paths a config needs, and the one
sentence users get when one is missing. Plain dict configs."""
import os.path as osp

import pytest

from orepa_mm.utils.data_check import MissingDatasetError, check_dataset_paths, iter_dataset_paths


def coco_like(root, ann='annotations/train.json', img='train2017/'):
    return dict(type='CocoDataset', data_root=str(root), ann_file=ann, data_prefix=dict(img=img))


def loader(dataset):
    return dict(batch_size=2, dataset=dataset)


@pytest.fixture
def coco_root(tmp_path):
    (tmp_path / 'annotations').mkdir()
    (tmp_path / 'annotations' / 'train.json').write_text('{}')
    (tmp_path / 'train2017').mkdir()
    return tmp_path


def test_present_dataset_passes(coco_root):
    cfg = dict(train_dataloader=loader(coco_like(coco_root)))
    check_dataset_paths(cfg)
    assert [p for _, p in iter_dataset_paths(cfg)] == [
        osp.join(str(coco_root), 'annotations/train.json'),
        osp.join(str(coco_root), 'train2017/'),
    ]


def test_missing_annotation_gives_one_sentence(coco_root):
    cfg = dict(val_dataloader=loader(coco_like(coco_root, ann='annotations/val.json')))
    with pytest.raises(MissingDatasetError) as info:
        check_dataset_paths(cfg)
    expected = osp.join(str(coco_root), 'annotations/val.json')
    assert str(
        info.value) == (f'Dataset not found: expected {expected} (for val); see docs/configs.md '
                        "(section 'Datasets') to download and place it.")
    assert (info.value.path, info.value.split) == (expected, 'val')


def test_missing_data_prefix_is_reported(coco_root):
    cfg = dict(test_dataloader=loader(coco_like(coco_root, img='val2017/')))
    with pytest.raises(MissingDatasetError, match=r'val2017.*\(for test\)'):
        check_dataset_paths(cfg)


def test_relative_paths_resolve_against_cwd(coco_root, monkeypatch):
    monkeypatch.chdir(coco_root.parent)
    cfg = dict(train_dataloader=loader(coco_like(coco_root.name, ann='annotations/missing.json')))
    with pytest.raises(MissingDatasetError) as info:
        check_dataset_paths(cfg)
    assert info.value.path == str(coco_root / 'annotations' / 'missing.json')


def test_wrappers_are_walked(coco_root):
    missing = coco_like(coco_root / 'nowhere')
    cfg = dict(
        train_dataloader=loader(
            dict(
                type='RepeatDataset',
                times=2,
                dataset=dict(
                    type='ConcatDataset',
                    datasets=[
                        coco_like(coco_root),
                        dict(type='ClassBalancedDataset', oversample_thr=0.1, dataset=missing)
                    ]))))
    with pytest.raises(MissingDatasetError, match='nowhere'):
        check_dataset_paths(cfg)


def test_mmseg_style_prefixes(tmp_path):
    (tmp_path / 'images' / 'training').mkdir(parents=True)
    cfg = dict(
        train_dataloader=loader(
            dict(
                type='ADE20KDataset',
                data_root=str(tmp_path),
                data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'))))
    with pytest.raises(MissingDatasetError, match='annotations/training'):
        check_dataset_paths(cfg)


def test_mmpretrain_string_prefix_and_bare_data_root(tmp_path):
    cfg = dict(
        train_dataloader=loader(
            dict(type='CustomDataset', data_root=str(tmp_path), data_prefix='')),
        val_dataloader=loader(
            dict(type='ImageNet', data_root=str(tmp_path / 'imagenet'), split='val')))
    check_dataset_paths(cfg, splits=('train', ))
    with pytest.raises(MissingDatasetError, match=r'imagenet \(for val\)'):
        check_dataset_paths(cfg)


@pytest.mark.parametrize(
    'dataset',
    [
        dict(type='SyntheticDataset', num_samples=4),  # no paths at all
        dict(type='CIFAR10', data_root='/nonexistent/cifar', download=True),
        dict(type='CocoDataset', data_root='s3://bucket/coco', ann_file='a.json'),
        dict(
            type='CocoDataset',
            data_root='/nonexistent/coco',
            ann_file='a.json',
            backend_args=dict(backend='petrel')),
    ],
    ids=['synthetic', 'downloads', 'uri', 'remote-backend'])
def test_skipped_datasets(dataset):
    check_dataset_paths(dict(train_dataloader=loader(dataset)))


def test_absent_or_null_dataloaders_are_ignored():
    check_dataset_paths(dict(train_dataloader=None))
    check_dataset_paths(dict())


def test_dataset_that_downloads_by_default_is_skipped():
    """mmpretrain's CIFAR10 defaults to download=True; configs omit it."""
    pytest.importorskip('mmpretrain')
    cfg = dict(
        default_scope='mmpretrain',
        train_dataloader=loader(dict(type='CIFAR10', data_root='/nonexistent/cifar10')))
    check_dataset_paths(cfg)
    cfg['train_dataloader']['dataset']['download'] = False
    with pytest.raises(MissingDatasetError, match='cifar10'):
        check_dataset_paths(cfg)
