# Faster R-CNN, OREPA-ResNet-50 + FPN, COCO 1x (12 epochs, 8 GPUs x 2 images).
# Identical to mmdet's faster-rcnn_r50_fpn_1x_coco.py except for the backbone type, its
# pretrained weights and a 0.1 LR multiplier on the stem (the authors' advice for OREPA stems).
#
# Weights: checkpoints/orepa_resnet50_official.pth, converted from the authors' ImageNet model:
#   python tools/convert_official_checkpoint.py <OREPA ResNet-50 .pth.tar> \
#       checkpoints/orepa_resnet50_official.pth
# Without it, start from stock torchvision weights (OREPA layers load plain conv weights
# exactly) with the one switch
#   --cfg-options model.backbone.init_cfg.checkpoint=torchvision://resnet50
# Data: data/coco/ (docs/configs.md, 'Datasets').
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
# Validation / test of the unconverted model generates each kernel once per epoch.
custom_hooks = [dict(type='ReparamKernelCacheHook')]

model = dict(
    backbone=dict(
        type='OREPAResNet',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/orepa_resnet50_official.pth')))

# Upstream freezes the stem (frozen_stages=1); the multiplier applies once it is unfrozen
# (e.g. --cfg-options model.backbone.frozen_stages=-1).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone.conv1': dict(lr_mult=0.1)}))
