# OREPA PSPNet on the synthetic shapes dataset (tools/demo_dataset.py): a quarter-width
# OREPA-ResNet-18-D8 (V1c deep stem) trained from scratch, small enough for a 2-core CPU in a
# few minutes (800 iterations: ~2 min, mIoU ~51 on the held-out images). `python tools/demo.py`
# runs it after the detector (train -> mIoU -> re-parameterize -> same mIoU); also trainable alone:
#   python tools/train.py configs/demo/pspnet_orepa_r18_demo.py
# once the data exist (`python tools/demo.py --only-data` writes them to data/demo/).
_base_ = 'mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py'

custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
# Validation / test of the unconverted model generates each kernel once per epoch.
custom_hooks = [dict(type='ReparamKernelCacheHook')]

data_root = 'data/demo/'
metainfo = dict(
    classes=('background', 'circle', 'square', 'triangle', 'star'),
    palette=[(0, 0, 0), (220, 20, 60), (0, 130, 230), (250, 170, 30), (120, 200, 60)])
img_scale = (256, 256)
crop_size = (128, 128)  # train on crops (4x cheaper), test on whole 256x256 images
norm_cfg = dict(type='BN', requires_grad=True)  # single process on CPU: no SyncBN
# ~90% of the pixels are background: weigh it down so the shapes are learnt in minutes
class_weight = [0.25, 1.0, 1.0, 1.0, 1.0]

model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        type='OREPAResNetV1c',
        depth=18,
        base_channels=16,
        stem_channels=16,
        norm_cfg=norm_cfg,
        init_cfg=None),
    decode_head=dict(
        in_channels=128,
        channels=64,
        num_classes=5,
        norm_cfg=norm_cfg,
        dropout_ratio=0.0,
        loss_decode=dict(class_weight=class_weight)),
    auxiliary_head=dict(
        in_channels=64,
        channels=32,
        num_classes=5,
        norm_cfg=norm_cfg,
        dropout_ratio=0.0,
        loss_decode=dict(class_weight=class_weight)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=False)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,  # loading 256-px images is cheap; a worker would only compete for cores
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='images/train', seg_map_path='seg_labels/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='images/val', seg_map_path='seg_labels/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 800
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(_delete_=True, max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, by_epoch=False, begin=30, end=max_iters)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=20), checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
