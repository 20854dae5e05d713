"""The demo: the synthetic dataset generator and short real training runs of both demo models.

The training tests go through ``tools/demo.py``'s own ``run_task`` (mmengine Runner: train,
test with the library metric, ``reparameterize_checkpoint``, test the deployed model) on a few
images generated into ``tmp_path``, for tens of iterations.
"""
import filecmp
import importlib.util
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from demo_dataset import (CLASSES, DET_METAINFO, SEG_CLASSES, SEG_METAINFO, DemoDatasetSpec,
                          draw_sample, ensure_demo_dataset, generate_demo_dataset)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = dict(num_train=3, num_val=2, img_size=96, min_size=10, max_size=40)


def load_demo_tool():
    spec = importlib.util.spec_from_file_location('orepa_demo_tool',
                                                  osp.join(REPO, 'tools', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures('one_thread')


def files_under(root):
    return sorted(osp.relpath(osp.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# -- the generator -----------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    generate_demo_dataset(tmp_path / 'a', **TINY, seed=3)
    generate_demo_dataset(tmp_path / 'b', **TINY, seed=3)
    generate_demo_dataset(tmp_path / 'c', **TINY, seed=4)
    names = files_under(tmp_path / 'a')
    assert names == files_under(tmp_path / 'b') == files_under(tmp_path / 'c')
    assert len(names) == 2 * (TINY['num_train'] + TINY['num_val']) + 3
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / 'a', tmp_path / 'b', names, shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(tmp_path / 'a', tmp_path / 'c', names, shallow=False)
    assert 'images/train/000000.jpg' in mismatch


def test_coco_and_seg_annotations_describe_the_same_visible_objects(tmp_path):
    from pycocotools.coco import COCO
    meta = generate_demo_dataset(tmp_path, num_train=6, num_val=2, seed=0)
    assert meta['classes'] == list(CLASSES)
    coco = COCO(str(tmp_path / 'annotations' / 'instances_train.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 6 and len(
        coco.getAnnIds()) == meta['counts']['train']['objects'] >= 6 * 2
    seen_labels = set()
    for img_info in coco.loadImgs(coco.getImgIds()):
        name = osp.splitext(img_info['file_name'])[0]
        img = cv2.imread(str(tmp_path / 'images' / 'train' / img_info['file_name']))
        seg = cv2.imread(
            str(tmp_path / 'seg_labels' / 'train' / (name + '.png')), cv2.IMREAD_UNCHANGED)
        assert img.shape == (256, 256, 3) and seg.shape == (256, 256) and seg.dtype == np.uint8
        assert seg.max() <= len(CLASSES)
        union = np.zeros_like(seg, dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_info['id']])):
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256 and w > 0 and h > 0
            mask = coco.annToMask(ann).astype(bool)
            # the polygon gives back the object's visible pixels, of its class in the label map
            same_class = seg[mask] == ann['category_id']
            assert same_class.mean() > 0.9
            assert abs(int(mask.sum()) - ann['area']) <= 0.1 * ann['area'] + 4
            union |= mask
            seen_labels.add(ann['category_id'])
        # every labelled pixel of the map belongs to some annotated object
        labelled = seg > 0
        assert (labelled & union).sum() >= 0.98 * labelled.sum()
    assert len(seen_labels) >= 3


def test_objects_vary_in_scale_and_some_are_partly_occluded():
    rng = np.random.default_rng(0)
    spec = DemoDatasetSpec()
    objects = [obj for _ in range(30) for obj in draw_sample(rng, spec)[1]]
    widths = [max(obj['bbox'][2:]) for obj in objects]
    assert min(widths) < 20 and max(widths) > 70
    assert 2 <= len(objects) / 30 <= spec.max_objects
    assert {obj['label'] for obj in objects} == set(range(len(CLASSES)))
    fractions = [obj['visible_fraction'] for obj in objects]
    assert min(fractions) >= 1 - spec.max_occlusion - 1e-6
    assert sum(f < 0.95 for f in fractions) >= 3  # occlusion happens


def test_visible_masks_are_the_label_map_pixels_of_their_class():
    rng = np.random.default_rng(1)
    spec = DemoDatasetSpec(max_occlusion=0.3)
    for _ in range(10):
        img, objects, labels = draw_sample(rng, spec)
        assert img.dtype == np.uint8 and img.shape == (256, 256, 3)
        for obj in objects:
            assert obj['visible_fraction'] >= 0.7 - 1e-6
            assert (labels[obj['mask']] == obj['label'] + 1).all()


def test_ensure_reuses_a_matching_dataset_and_redraws_otherwise(tmp_path):
    meta, generated = ensure_demo_dataset(tmp_path / 'd', **TINY)
    assert generated
    stamp = os.stat(tmp_path / 'd' / 'meta.json').st_mtime_ns
    again, generated = ensure_demo_dataset(tmp_path / 'd', **TINY)
    assert not generated and again == meta
    assert os.stat(tmp_path / 'd' / 'meta.json').st_mtime_ns == stamp
    _, generated = ensure_demo_dataset(tmp_path / 'd', **{**TINY, 'seed': 1})
    assert generated
    with open(tmp_path / 'd' / 'meta.json') as f:
        assert json.load(f)['spec']['seed'] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]


def test_metainfo_matches_the_demo_configs():
    from mmengine.config import Config
    det = Config.fromfile(osp.join(REPO, 'configs', 'demo', 'faster_rcnn_orepa_r18_demo.py'))
    seg = Config.fromfile(osp.join(REPO, 'configs', 'demo', 'pspnet_orepa_r18_demo.py'))
    assert tuple(det.train_dataloader.dataset.metainfo.classes) == DET_METAINFO['classes']
    assert tuple(seg.train_dataloader.dataset.metainfo.classes) == SEG_METAINFO['classes']
    assert SEG_CLASSES[1:] == CLASSES
    assert det.model.roi_head.bbox_head.num_classes == len(CLASSES)
    assert seg.model.decode_head.num_classes == len(SEG_CLASSES)


# -- short real training runs ------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_data')
    generate_demo_dataset(root, num_train=16, num_val=8, seed=0)
    return str(root)


def check_run(res, headline, tmp_path):
    losses = res.losses
    assert len(losses) >= 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert headline in res.before and headline in res.after
    assert res.metrics_equal, (res.before, res.after)
    assert all(res.before[k] == pytest.approx(res.after[k], abs=res.tolerance)
               for k in res.metric_names if k in res.before)
    assert res.num_reparameterized > 10 and res.max_rel_error < 1e-4
    assert res.deploy_cost['params'] < res.train_cost['params']
    for path in (res.checkpoint, res.config, res.deploy_checkpoint, res.deploy_config):
        assert osp.isfile(path) and path.startswith(str(tmp_path))
    assert 'OREPA' not in open(res.deploy_config).read().split('\n', 3)[-1]
    assert set(res.ms_per_image) == {'unconverted', 'deployed'}


@pytest.mark.slow
def test_demo_detector_trains_evaluates_and_deploys(tiny_demo_data, tmp_path):
    demo = load_demo_tool()
    res = demo.run_task(
        demo.DET_TASK,
        tiny_demo_data,
        str(tmp_path / 'det'),
        cfg_options={
            'train_dataloader.batch_size': 4,
            'train_cfg.max_epochs': 6,  # 16 images / 4 = 4 iterations per epoch
            'param_scheduler':
            [dict(type='LinearLR', start_factor=0.2, by_epoch=False, begin=0, end=4)],
            'default_hooks.logger.interval': 4,
            'default_hooks.checkpoint.interval': 6,
        },
        timing_batches=1,
        timing_rounds=1)
    check_run(res, 'coco/bbox_mAP', tmp_path)
    table = demo.format_table(res, 'tiny', threads=1)
    assert 'coco/bbox_mAP' in table and 'equal' in table and 'deploy.pth' in table


@pytest.mark.slow
def test_demo_segmentor_trains_evaluates_and_deploys(tiny_demo_data, tmp_path):
    demo = load_demo_tool()
    res = demo.run_task(
        demo.SEG_TASK,
        tiny_demo_data,
        str(tmp_path / 'seg'),
        cfg_options={
            'train_dataloader.batch_size': 4,
            'train_cfg.max_iters': 24,
            'param_scheduler':
            [dict(type='LinearLR', start_factor=0.2, by_epoch=False, begin=0, end=4)],
            'default_hooks.logger.interval': 4,
            'default_hooks.checkpoint.interval': 24,
        },
        timing_batches=1,
        timing_rounds=1)
    check_run(res, 'mIoU', tmp_path)
    assert 0 <= res.before['mIoU'] <= 100
