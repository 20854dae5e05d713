"""Tiny train-time configs for the re-parameterization tests (written to tmp_path as .py files).

Each is a real model of its library, shrunk to 8-channel backbones and small heads so that
building, converting and verifying take about a second; each imports orepa_mm through
``custom_imports`` exactly as a user's config would.
"""

DETECTOR = '''
default_scope = 'mmdet'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='FasterRCNN',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='OREPAResNet', depth=18, base_channels=8, num_stages=4,
                  out_indices=(0, 1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True,
                  style='pytorch',
                  init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18')),
    neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=16, num_outs=5),
    rpn_head=dict(
        type='RPNHead', in_channels=16, feat_channels=16,
        anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                out_channels=16, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead', in_channels=16, fc_out_channels=32, roi_feat_size=7,
            num_classes=3,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
    train_cfg=None,
    test_cfg=dict(
        rpn=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7),
                 min_bbox_size=0),
        rcnn=dict(score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5), max_per_img=10)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 48), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                          'scale_factor')),
]
test_dataloader = dict(
    batch_size=1, num_workers=0,
    dataset=dict(type='CocoDataset', data_root='data/coco/', ann_file='ann.json',
                 data_prefix=dict(img='val/'), test_mode=True, pipeline=test_pipeline))
load_from = 'work_dirs/some_pretrained.pth'
'''
#: (H, W) the detector's test pipeline gives: Resize(scale=(w=64, h=48)).
DETECTOR_SIZE = (48, 64)

SEGMENTOR = '''
default_scope = 'mmseg'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
crop_size = (32, 32)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                           seg_pad_val=255, size=crop_size),
    pretrained='open-mmlab://resnet18_v1c',
    backbone=dict(type='OREPAResNetV1c', depth=18, stem_channels=8, base_channels=8,
                  num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                  strides=(1, 2, 1, 1), norm_cfg=norm_cfg, norm_eval=False, style='pytorch',
                  contract_dilation=True),
    decode_head=dict(type='PSPHead', in_channels=64, in_index=3, channels=16,
                     pool_scales=(1, 2, 3, 6), dropout_ratio=0.1, num_classes=4,
                     norm_cfg=norm_cfg, align_corners=False,
                     conv_cfg=dict(type='OREPA'),
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                      loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=32, in_index=2, channels=8, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=4,
                        norm_cfg=norm_cfg, align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                         loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 32), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1, num_workers=0,
    dataset=dict(type='ADE20KDataset', data_root='data/ade', test_mode=True,
                 data_prefix=dict(img_path='images', seg_map_path='annotations'),
                 pipeline=test_pipeline))
'''
SEGMENTOR_SIZE = (32, 64)

CLASSIFIER = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=5, mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], to_rgb=True),
    backbone=dict(type='OREPAVGG',
                  arch=dict(num_blocks=[1, 2, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25],
                            group_layer_map=None, se_cfg=None),
                  out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels=128,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=40, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs'),
]
test_dataloader = dict(
    batch_size=1, num_workers=0,
    dataset=dict(type='ImageNet', data_root='data/imagenet', split='val',
                 pipeline=test_pipeline))
'''
CLASSIFIER_SIZE = (32, 32)

#: mmseg segmentor with an OREPAVGG backbone: deploys to ``mmpretrain.RepVGG`` + custom import.
SEGMENTOR_VGG = '''
default_scope = 'mmseg'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, size=(32, 32)),
    backbone=dict(type='OREPAVGG',
                  arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25],
                            group_layer_map=None, se_cfg=None),
                  out_indices=(1, 2, 3)),
    decode_head=dict(type='FCNHead', in_channels=128, in_index=2, channels=8, num_convs=1,
                     concat_input=False, num_classes=3, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                      loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
'''

#: mmpretrain's SE-ResNet-50 (squeeze-excitation after each bottleneck) with OREPA convs, thin.
SE_RESNET_CLASSIFIER = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=5, mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], to_rgb=True),
    backbone=dict(type='SEResNet', depth=50, stem_channels=8, base_channels=8,
                  conv_cfg=dict(type='OREPA'), out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels=256,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=40, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs'),
]
'''

#: A classifier without anything to re-parameterize.
STOCK_CLASSIFIER = '''
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
'''
